"""``tools/dist_train.sh`` with 2 CPU processes (gloo) against 1 process with the same total batch.

Both runs train a tiny FATR Segmenter (derived from
``configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py``) on synthetic
64×64 images for a few SGD iterations through ``tools/train.py``. Everything random is removed
(no crop, flip or photometric jitter, ``drop_path_rate=0``, one model seed) and the data order is
made identical: mmengine's samplers give rank ``r`` the indices ``r::world_size`` of the unshuffled
order, so 2 ranks × batch 1 see, at every iteration, exactly the images of 1 process × batch 2.

The loss is comparable without correcting for ignored pixels: mmseg's ``CrossEntropyLoss``
(``avg_non_ignore=False``) averages over all pixels, ignored ones included, and every image has
the same number of pixels. So the batch-2 loss is the mean of the two ranks' losses, and DDP's
averaged gradient is the batch-2 gradient; what is left is float summation order (about 1e-7
relative), hence the tolerances below.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_configs import NO_EVAL, TINY_MODEL
from torch.testing import assert_close

from fatr_seg.datasets import write_dataset
from fatr_seg.models import allow_mmengine_checkpoints

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py"
MAX_ITERS = 3

# Records every iteration's loss on every rank (mmengine logs rank 0's only).
LOSS_RECORDER = """
import json
import os

from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class LossRecorderHook(Hook):
    def __init__(self):
        self.losses = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses.append(outputs["loss"].item())

    def after_train(self, runner):
        path = os.path.join(runner.work_dir, f"losses_rank{get_rank()}.json")
        with open(path, "w") as f:
            json.dump(self.losses, f)
"""

TINY_CONFIG = (
    """
_base_ = [{base!r}]
custom_imports = dict(imports=['fatr_seg.models', 'loss_recorder'], allow_failed_imports=False)
crop_size = (64, 64)
pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size={batch_size},
    num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=False),
    dataset=dict(data_root={data_root!r}, pipeline=pipeline))
"""
    + NO_EVAL
    + TINY_MODEL
    + """optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=1e-4),
    clip_grad=None,
    _delete_=True)
param_scheduler = []
train_cfg = dict(max_iters={max_iters}, val_interval=1000)
default_hooks = dict(
    logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=-1, save_last=False))
custom_hooks = [dict(type='LossRecorderHook')]
randomness = dict(seed=0)
"""
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env, log_path):
    log = open(log_path, "w")  # closed by `wait`
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def wait(run, what, timeout=400):
    proc, log = run
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    finally:
        log.close()
    if rc != 0:
        pytest.fail(f"{what} failed ({rc}):\n{Path(log.name).read_text()[-4000:]}")


def load_state(work_dir, it):
    allow_mmengine_checkpoints()  # a Runner checkpoint, read with torch.load
    ckpt = torch.load(work_dir / f"iter_{it}.pth", map_location="cpu")
    return ckpt["state_dict"]


@pytest.mark.slow
@pytest.mark.skipif(
    not DEMO_CONFIG.is_file(),
    reason="configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py not written yet",
)
def test_two_processes_match_one_process_with_the_same_total_batch(tmp_path):
    data_root = str(tmp_path / "data")
    write_dataset(data_root, num_train=4, num_val=1, size=64, seed=0, progress=False)
    (tmp_path / "loss_recorder.py").write_text(LOSS_RECORDER)
    for name, batch_size in (("dist", 1), ("single", 2)):
        fields = dict(base=str(DEMO_CONFIG), data_root=data_root, max_iters=MAX_ITERS)
        (tmp_path / f"{name}.py").write_text(TINY_CONFIG.format(batch_size=batch_size, **fields))

    env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO), env.get("PYTHONPATH", "")])
    dist_dir, single_dir = tmp_path / "work_dist", tmp_path / "work_single"
    dist_cmd = ["bash", "tools/dist_train.sh", str(tmp_path / "dist.py"), "2"]
    dist_cmd += ["--work-dir", str(dist_dir), "--cfg-options", "env_cfg.dist_cfg.backend=gloo"]
    single_cmd = [sys.executable, "tools/train.py", str(tmp_path / "single.py")]
    single_cmd += ["--work-dir", str(single_dir)]
    dist = start(dist_cmd, env, tmp_path / "dist.log")
    single = start(single_cmd, env, tmp_path / "single.log")
    wait(dist, "tools/dist_train.sh (2 processes, gloo)")
    wait(single, "tools/train.py (1 process)")

    rank0 = json.loads((dist_dir / "losses_rank0.json").read_text())
    rank1 = json.loads((dist_dir / "losses_rank1.json").read_text())
    single_losses = json.loads((single_dir / "losses_rank0.json").read_text())
    assert len(rank0) == len(rank1) == len(single_losses) == MAX_ITERS
    # The ranks saw different images (otherwise the comparison below proves little).
    assert all(abs(a - b) > 1e-3 for a, b in zip(rank0, rank1))
    mean = [(a + b) / 2 for a, b in zip(rank0, rank1)]
    assert_close(torch.tensor(mean), torch.tensor(single_losses), rtol=1e-5, atol=1e-6)

    first, last = load_state(single_dir, 1), load_state(single_dir, MAX_ITERS)
    moved = max((last[k] - first[k]).abs().max().item() for k in last)
    assert moved > 1e-3, "training did not change the parameters"
    dist_state = load_state(dist_dir, MAX_ITERS)
    assert dist_state.keys() == last.keys()
    for key in last:
        assert_close(dist_state[key], last[key], rtol=1e-4, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------
# setup_cpu_distributed on its own (no processes): what it changes in the config, and when
# ---------------------------------------------------------------------------------------------
def test_setup_cpu_distributed(monkeypatch):
    from mmengine.config import Config

    from fatr_seg.models.dist import setup_cpu_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = Config(dict(find_unused_parameters=True, env_cfg=dict(dist_cfg=dict(backend="nccl"))))
    assert not setup_cpu_distributed(cfg, "none")
    assert "model_wrapper_cfg" not in cfg
    with pytest.raises(ValueError, match="--launcher slurm needs CUDA"):
        setup_cpu_distributed(cfg, "slurm")

    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(kw))
    assert setup_cpu_distributed(cfg, "pytorch")
    assert calls[0]["backend"] == "gloo"  # NCCL needs CUDA
    assert cfg.model_wrapper_cfg == dict(
        type="MMDistributedDataParallel",
        broadcast_buffers=False,
        find_unused_parameters=True,
        device_ids=None,
    )

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu_cfg = Config(dict())
    assert not setup_cpu_distributed(gpu_cfg, "pytorch")
    assert "model_wrapper_cfg" not in gpu_cfg


# ---------------------------------------------------------------------------------------------
# tools/slurm_train.sh: the srun command it builds (a stand-in srun records its arguments)
# ---------------------------------------------------------------------------------------------
def test_slurm_script_builds_the_srun_command(tmp_path):
    record = tmp_path / "srun_args.txt"
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": "/opt/venv/bin/python",
        "GPUS_PER_NODE": "4",
    }
    script = REPO / "tools" / "slurm_train.sh"
    cmd = ["bash", str(script), "part", "job", "configs/fatr_ade20k.py", "8", "--amp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = record.read_text().splitlines()
    assert args[:7] == [
        "-p", "part", "--job-name=job", "--gres=gpu:4", "--ntasks=8", "--ntasks-per-node=4",
        "--cpus-per-task=5",
    ]  # fmt: skip
    assert args[-7:] == [
        "/opt/venv/bin/python", "-u", "tools/train.py", "configs/fatr_ade20k.py",
        "--launcher", "slurm", "--amp",
    ]  # fmt: skip
