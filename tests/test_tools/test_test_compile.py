"""``tools/test.py --compile``: the same predictions and mIoU as the eager run.

A tiny FATR Segmenter (the one of ``tiny_configs.TINY_MODEL``) with random weights is saved as a
checkpoint and evaluated twice on 3 generated 64×64 images, in subprocesses as a user runs it:
eagerly, and with ``--compile`` (``CompileInferenceHook``: backbone and head through inductor).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmseg.registry import MODELS
from PIL import Image
from tiny_configs import TINY_MODEL

from fatr_seg.datasets import write_dataset

REPO = Path(__file__).resolve().parents[2]
CONFIG = (
    """
_base_ = [{base!r}]
crop_size = (64, 64)
"""
    + TINY_MODEL
)


def _run(args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


@pytest.mark.slow
def test_compiled_test_run_gives_eager_predictions(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, num_train=1, num_val=3, size=64, seed=0, progress=False)
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG.format(base=str(REPO / "configs" / "fatr_ade20k_demo.py")))
    cfg = Config.fromfile(str(config))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    ckpt = tmp_path / "random.pth"
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), ckpt)
    options = [f"test_dataloader.dataset.data_root={data}", "test_dataloader.num_workers=0"]
    preds = {}
    for mode, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / mode
        proc = _run(["tools/test.py", config, ckpt, "--work-dir", tmp_path / f"work_{mode}",
                     "--out", out, *extra, "--cfg-options", *options])  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        preds[mode] = {p.name: np.array(Image.open(p)) for p in sorted(out.glob("*.png"))}
        compiled_log = "CompileInferenceHook: compiled" in proc.stdout + proc.stderr
        assert compiled_log == (mode == "compiled")
    assert len(preds["eager"]) == 3 and preds["eager"].keys() == preds["compiled"].keys()
    for name, eager in preds["eager"].items():
        assert np.array_equal(eager, preds["compiled"][name]), name
