"""Multi-process training without CUDA (gloo), which mmengine 0.10.7's Runner does not support.

mmengine assumes one GPU per process in two places:

* ``init_dist('pytorch', ...)`` calls ``torch.cuda.set_device(LOCAL_RANK)`` before creating the
  process group, which raises on a machine without a CUDA driver;
* ``Runner.wrap_model`` gives ``MMDistributedDataParallel`` ``device_ids=[LOCAL_RANK]``, which
  DDP rejects for a module on the CPU.

:func:`setup_cpu_distributed` creates the process group itself from torchrun's environment (the
Runner then skips ``init_dist``) and asks for DDP's CPU mode (``device_ids=None``). With CUDA it
does nothing, so GPU training is untouched.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

__all__ = ["setup_cpu_distributed"]

_DDP_TYPES = ("MMDistributedDataParallel", "DistributedDataParallel")


def setup_cpu_distributed(cfg, launcher: str) -> bool:
    """Prepare the process group and ``cfg.model_wrapper_cfg`` for multi-process CPU training.

    Call it after loading the config and before ``Runner.from_cfg(cfg)``.

    Args:
        cfg: An mmengine ``Config``. ``env_cfg.dist_cfg`` gives the backend (``'nccl'``, the mmseg
            default, is replaced by ``'gloo'``: NCCL needs CUDA) and the timeout in seconds.
        launcher: The ``--launcher`` argument of ``tools/train.py``.

    Returns:
        True if it set up CPU training; False when there is nothing to do (single process, or
        CUDA is available).

    Raises:
        ValueError: For a launcher other than ``'pytorch'`` (torchrun) without CUDA, naming it.
    """
    if launcher == "none" or torch.cuda.is_available():
        return False
    if launcher != "pytorch":
        raise ValueError(
            f"--launcher {launcher} needs CUDA; on CPU use tools/dist_train.sh (--launcher pytorch)"
        )
    dist_cfg = dict((cfg.get("env_cfg") or {}).get("dist_cfg") or {})
    backend = dist_cfg.get("backend", "gloo")
    backend = "gloo" if backend == "nccl" else backend
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=dist_cfg.get("timeout", 1800))
        dist.init_process_group(backend=backend, timeout=timeout)  # env:// from torchrun
    wrapper = cfg.get("model_wrapper_cfg")
    if wrapper is None:
        # What Runner.wrap_model would build, minus the GPU id.
        wrapper = dict(
            type="MMDistributedDataParallel",
            broadcast_buffers=False,
            find_unused_parameters=cfg.get("find_unused_parameters", False),
        )
    if wrapper.get("type", "MMDistributedDataParallel") in _DDP_TYPES:
        wrapper["device_ids"] = None
    cfg.model_wrapper_cfg = wrapper
    return True
