"""``tools/train.py --resume`` and ``tools/dist_test.sh`` on CPU, through the tools' own set-up.

A tiny FATR model derived from
``configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py`` (4 blocks of width 32, the default
reduction at blocks 2 and 3) trains on synthetic 64×64 images. The config drops the inherited
``AllowMMEngineCheckpointsHook`` (``custom_hooks = []``), so resuming works only because
``tools/train.py`` installs the checkpoint allow-list itself (importing ``fatr_seg`` does not);
likewise ``tools/test.py`` under ``--launcher pytorch`` must create its gloo process group itself
(mmengine's launcher needs CUDA).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from torch.testing import assert_close

from fatr_seg.analysis.demo_report import read_test_metrics
from fatr_seg.datasets import write_dataset

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py"
TOTAL, SPLIT = 4, 2

TINY_CONFIG = """
_base_ = [{base!r}]
crop_size = (64, 64)
custom_hooks = []
train_dataloader = dict(  # no random crop or flip: their draws are not part of a checkpoint
    batch_size=2,
    num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=True, seed=0),
    dataset=dict(data_root={data_root!r}, pipeline={{{{_base_.test_pipeline}}}}))
test_dataloader = dict(num_workers=0, dataset=dict(data_root={data_root!r}))
val_dataloader = None
val_evaluator = None
val_cfg = None
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(img_size=crop_size, embed_dims=32, num_layers=4, num_heads=2,
                  reduction=dict(layers=(2, 3), keep_ratio=(0.55, 0.6),
                                 score=('window_hf', 'hf_bipartite'))),
    decode_head=dict(in_channels=32, channels=32))
train_cfg = dict(max_iters={total}, val_interval=1000)
param_scheduler = [dict(type='PolyLR', power=1.0, eta_min=1e-5, by_epoch=False, begin=0,
                        end={total})]
default_hooks = dict(
    logger=dict(interval=1), checkpoint=dict(interval={split}, max_keep_ckpts=-1, save_last=False))
log_processor = dict(window_size=1)
randomness = dict(seed=0)
"""


def run(args, env=None, timeout=600):
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train(config, work_dir, *extra):
    return run([sys.executable, "tools/train.py", str(config), "--work-dir", str(work_dir), *extra])


def losses(work_dir):
    """``{iteration: loss}`` from the newest run's scalars in ``work_dir``."""
    path = sorted(Path(work_dir).glob("*/vis_data/scalars.json"))[-1]
    records = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_tool")
    write_dataset(tmp / "data", num_train=6, num_val=4, size=64, seed=0, progress=False)
    config = tmp / "tiny.py"
    config.write_text(TINY_CONFIG.format(base=str(DEMO_CONFIG), data_root=str(tmp / "data"),
                                         total=TOTAL, split=SPLIT))  # fmt: skip
    # Trained to SPLIT once: the run the resume test continues, and the checkpoint the
    # distributed test evaluates (resuming adds later checkpoints, never rewrites this one).
    train(config, tmp / "split", "--cfg-options", f"train_cfg.max_iters={SPLIT}")
    assert (tmp / "split" / f"iter_{SPLIT}.pth").is_file()
    return tmp, config


@pytest.mark.slow
def test_train_resume_continues_like_an_uninterrupted_run(tiny):
    tmp, config = tiny
    train(config, tmp / "full")
    resumed = train(config, tmp / "split", "--resume")
    assert f"resumed epoch: 0, iter: {SPLIT}" in resumed.stdout + resumed.stderr
    assert (tmp / "split" / f"iter_{TOTAL}.pth").is_file()
    full, after = losses(tmp / "full"), losses(tmp / "split")
    assert sorted(after) == list(range(SPLIT + 1, TOTAL + 1))
    assert len(set(full.values())) == TOTAL  # the losses move: equal values are not a fluke
    for it in after:
        assert_close(after[it], full[it], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_dist_test_on_cpu_matches_one_process(tiny):
    tmp, config = tiny
    ckpt = tmp / "split" / f"iter_{SPLIT}.pth"
    run([sys.executable, "tools/test.py", str(config), str(ckpt), "--work-dir", str(tmp / "t1")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(port))
    run(["bash", "tools/dist_test.sh", str(config), str(ckpt), "2", "--work-dir",
         str(tmp / "t2")], env=env)  # fmt: skip
    one, two = read_test_metrics(str(tmp / "t1")), read_test_metrics(str(tmp / "t2"))
    assert_close(two["mIoU"], one["mIoU"], rtol=0, atol=1e-6)
    assert two["per_class"].keys() == one["per_class"].keys()
