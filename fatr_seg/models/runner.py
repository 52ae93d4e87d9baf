"""What ``tools/train.py`` and ``tools/test.py`` share: common options, the config, the Runner.

:func:`build_runner` is also where the process-wide set-up is made, as explicit calls rather than
import side effects: torch's ``weights_only`` allow-list for mmengine checkpoints
(:func:`~fatr_seg.models.safe_globals.allow_mmengine_checkpoints`) and, for ``--launcher pytorch``
without CUDA, the gloo process group (:func:`~fatr_seg.models.dist.setup_cpu_distributed`).
Code that builds its own Runner makes the same two calls, or lists
``AllowMMEngineCheckpointsHook`` in the config's ``custom_hooks``. Every Runner built here also
gets :class:`~fatr_seg.models.hooks.UnreducedCheckpointHook`, so that a FATR config loads the
checkpoint of its unreduced model (``load_from``, ``tools/test.py CONFIG CHECKPOINT``) without
mmengine's warning about the reduction's own parameters, which keep their identity init.
"""

from __future__ import annotations

import os
import os.path as osp

from mmengine.config import Config, DictAction

from .convert import CheckpointError
from .dist import setup_cpu_distributed
from .hooks import UnreducedCheckpointHook
from .preflight import PreflightError, check_config
from .safe_globals import allow_mmengine_checkpoints

__all__ = ["LAUNCHERS", "add_runner_args", "build_runner", "load_config", "run_tool"]

LAUNCHERS = ("none", "pytorch", "slurm", "mpi")


def add_runner_args(parser, work_dir_help: str, cfg_options_help: str) -> None:
    """Add ``--work-dir``, ``--cfg-options``, ``--launcher`` and ``--local-rank`` to ``parser``."""
    parser.add_argument("--work-dir", help=work_dir_help)
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help=cfg_options_help)
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)


def load_config(args) -> Config:
    """The config ``args.config`` with ``--cfg-options`` merged, its launcher and work dir set.

    The work dir is ``--work-dir``, else the config's ``work_dir``, else
    ``./work_dirs/<config name>`` (as in mmseg's tools).

    Raises:
        PreflightError: The config file does not exist.
    """
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if not osp.isfile(args.config):
        raise PreflightError(f"config not found: {args.config}")
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = (
        args.work_dir
        or cfg.get("work_dir")
        or osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    )
    return cfg


def build_runner(cfg: Config, train: bool):
    """Check ``cfg`` (:func:`~fatr_seg.models.preflight.check_config`), set up the process and
    build mmengine's Runner.

    Args:
        cfg: The complete config, ``cfg.launcher`` included (see :func:`load_config`).
        train: Whether the Runner will train (then the training data and the pretrained
            checkpoint are checked too).

    Raises:
        PreflightError: A data directory or checkpoint is missing, or the model's parts do not
            fit together; nothing has been built.
    """
    from mmengine.runner import Runner

    check_config(cfg, train=train)
    allow_mmengine_checkpoints()
    setup_cpu_distributed(cfg, cfg.get("launcher", "none"))
    runner = Runner.from_cfg(cfg)
    runner.register_hook(UnreducedCheckpointHook())
    return runner


def run_tool(args, configure, train: bool) -> None:
    """What ``tools/train.py`` and ``tools/test.py`` do with their parsed ``args``.

    Load the config (:func:`load_config`), let ``configure(cfg, args)`` apply the tool's own
    options, build the Runner (:func:`build_runner`), then train or test.

    Raises:
        SystemExit: With one line (``error: ...``) for a :class:`PreflightError` (a missing
            config, checkpoint, data directory or pretrained checkpoint, or model parts that do
            not fit together; nothing has been built then), and for a :class:`CheckpointError`
            (pretrained weights that are unreadable, do not match or cannot be downloaded).
    """
    try:
        cfg = load_config(args)
        configure(cfg, args)
        runner = build_runner(cfg, train=train)
    except PreflightError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        if train:
            runner.train()
        else:
            runner.test()
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    end_distributed_rank()


def end_distributed_rank() -> None:
    """End a rank of a distributed run once its work is done, skipping the interpreter's exit.

    With gloo (CPU), a rank of ``tools/dist_test.sh`` aborted now and then at the interpreter's
    exit, after its results were written (``terminate called without an active exception``,
    exit -6, with or without the process group destroyed first), and torchrun then failed the
    whole job. So: destroy the process group, flush the logs and the standard streams, and
    leave with ``os._exit(0)``. Does nothing outside a distributed run.
    """
    import logging
    import os
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
