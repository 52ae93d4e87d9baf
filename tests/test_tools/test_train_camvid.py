"""``tools/train.py`` and ``tools/test.py`` on the CamVid configs, with hand-made CamVid data.

A tiny version of ``configs/camvid/fatr_vit-t_camvid.py`` (4 blocks of width 32, its local stage
at block 2 and global merging at 3, no pretrained weights) keeps the config's own data pipelines,
schedule and evaluation, and trains 2 iterations on four 360x480 images in a subprocess, exactly
as a user runs it, validating at the end; ``tools/test.py`` then evaluates the checkpoint on the
test split.
"""

import json
import subprocess
import sys

import pytest
from camvid_data import REPO, write_camvid

CONFIGS = REPO / "configs" / "camvid"
MAX_ITERS = 2
TINY = """_base_ = [{base!r}]
model = dict(
    backbone=dict(embed_dims=32, num_layers=4, num_heads=2, drop_path_rate=0.0,
                  reduction=dict(layers=(2, 3), keep_ratio=(0.5, 0.7),
                                 score=('window_hf', 'hf_bipartite')), init_cfg=None),
    decode_head=dict(in_channels=32, channels=32, num_heads=2, embed_dims=32, num_layers=1))
"""


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def loader_options(root, loaders):
    opts = []
    for loader in loaders:
        opts += [f"{loader}.dataset.data_root={root}", f"{loader}.num_workers=0",
                 f"{loader}.persistent_workers=False"]  # fmt: skip
    return opts


@pytest.mark.slow
def test_tiny_camvid_train_then_test(tmp_path):
    root = tmp_path / "camvid"
    write_camvid(root, {"train": 4, "val": 2, "test": 2}, size=(360, 480))
    config = tmp_path / "tiny_fatr_vit-t_camvid.py"
    config.write_text(TINY.format(base=str(CONFIGS / "fatr_vit-t_camvid.py")))
    work = tmp_path / "work"
    train = run("tools/train.py", config, "--work-dir", work, "--cfg-options",
                *loader_options(root, ("train_dataloader", "val_dataloader")),
                "train_dataloader.batch_size=2", f"train_cfg.max_iters={MAX_ITERS}",
                f"train_cfg.val_interval={MAX_ITERS}", f"param_scheduler.0.end={MAX_ITERS}",
                f"default_hooks.checkpoint.interval={MAX_ITERS}",
                "default_hooks.logger.interval=1")  # fmt: skip
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert (work / f"iter_{MAX_ITERS}.pth").is_file()
    records = [json.loads(line) for path in work.glob("*/vis_data/scalars.json")
               for line in path.read_text().splitlines() if line.strip()]  # fmt: skip
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == MAX_ITERS and all(0.0 < v < 100.0 for v in losses)
    miou = [r["mIoU"] for r in records if "mIoU" in r]
    assert len(miou) == 1 and 0.0 <= miou[0] <= 100.0
    # The per-class table of the validation names CamVid's classes.
    assert "Bicyclist" in train.stdout + train.stderr

    ckpt = work / f"iter_{MAX_ITERS}.pth"
    test = run("tools/test.py", config, ckpt, "--work-dir", tmp_path / "test", "--cfg-options",
               *loader_options(root, ("test_dataloader",)))  # fmt: skip
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    assert "mIoU" in test.stdout + test.stderr


@pytest.mark.slow
def test_train_missing_root_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "no_camvid"
    proc = run("tools/train.py", CONFIGS / "segmenter_vit-t_camvid.py", "--work-dir",
               tmp_path / "work", "--cfg-options",
               *loader_options(missing, ("train_dataloader", "val_dataloader")))  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data directory not found: {missing}/images/val "
        "(val_dataloader; see docs/usage.md, section 'CamVid')")  # fmt: skip
