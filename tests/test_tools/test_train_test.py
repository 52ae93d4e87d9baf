"""``tools/train.py`` then ``tools/test.py`` on a tiny generated set: a checkpoint and an mIoU.

A tiny FATR Segmenter (4 blocks of width 32, reduction at blocks 2 and 3) derived from
``configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py``
trains for a few iterations on 8 synthetic 64×64 images, in a
subprocess exactly as a user runs it; the test run's metrics are read back the way
``tools/demo.py`` reads them (``fatr_seg.analysis.demo_report``).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_configs import TINY_MODEL

from fatr_seg.analysis.demo import last_checkpoint
from fatr_seg.analysis.demo_report import read_test_metrics
from fatr_seg.datasets import write_dataset

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py"

MAX_ITERS = 3
TINY_CONFIG = (
    """
_base_ = [{base!r}]
crop_size = (64, 64)
"""
    + TINY_MODEL
)


def _loader_options(data_root):
    opts = []
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        opts += [f"{loader}.dataset.data_root={data_root}", f"{loader}.num_workers=0"]
    return opts


def _run(args, cwd=REPO):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Train the tiny model for ``MAX_ITERS`` iterations, then test its last checkpoint."""
    tmp = tmp_path_factory.mktemp("train_test")
    data_root = tmp / "data"
    write_dataset(data_root, num_train=8, num_val=4, size=64, seed=0, progress=False)
    config = tmp / "tiny_fatr_demo.py"
    config.write_text(TINY_CONFIG.format(base=str(DEMO_CONFIG)))
    work = tmp / "work"
    train = _run(["tools/train.py", config, "--work-dir", work, "--cfg-options",
                  *_loader_options(data_root), f"train_cfg.max_iters={MAX_ITERS}",
                  f"train_cfg.val_interval={MAX_ITERS}", "train_dataloader.batch_size=2",
                  f"default_hooks.checkpoint.interval={MAX_ITERS}",
                  "default_hooks.logger.interval=1"])  # fmt: skip
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    ckpt = last_checkpoint(str(work))
    test_dir = tmp / "test"
    test = _run(["tools/test.py", config, ckpt, "--work-dir", test_dir, "--cfg-options",
                 *_loader_options(data_root)])  # fmt: skip
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    return dict(work=work, ckpt=Path(ckpt), test_dir=test_dir, train=train, test=test)


@pytest.mark.slow
def test_train_writes_checkpoint_and_logs(tiny_run):
    assert tiny_run["ckpt"].name == f"iter_{MAX_ITERS}.pth"
    scalars = sorted(tiny_run["work"].glob("*/vis_data/scalars.json"))
    assert scalars, "mmengine wrote no training scalars"
    records = [json.loads(s) for s in scalars[-1].read_text().splitlines() if s.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == MAX_ITERS and all(0.0 < v < 100.0 for v in losses)


@pytest.mark.slow
def test_test_gives_miou(tiny_run):
    metrics = read_test_metrics(str(tiny_run["test_dir"]))
    assert isinstance(metrics["mIoU"], float) and 0.0 <= metrics["mIoU"] <= 100.0
    assert 0.0 <= metrics["aAcc"] <= 100.0
    # The per-class table names the 9 synthetic classes (mmseg prints it to the test log).
    from fatr_seg.datasets import CLASSES

    assert set(metrics["per_class"]) == set(CLASSES)
    assert all(v != v or 0.0 <= v <= 100.0 for v in metrics["per_class"].values())  # NaN allowed


@pytest.mark.slow
def test_train_missing_data_root_is_one_line(tmp_path):
    missing = tmp_path / "no_such_data"
    proc = _run(["tools/train.py", DEMO_CONFIG, "--work-dir", tmp_path / "work", "--cfg-options",
                 *_loader_options(missing)])  # fmt: skip
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err and str(missing) in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").rglob("*.pth"))
