"""``tools/test.py --compile``: the same predictions as the eager run; ``--amp`` runs.

A tiny FATR Segmenter with random weights is saved as a checkpoint and evaluated on 3
generated 64×64 images, in subprocesses as a user runs it with ``--compile``
(``CompileInferenceHook``: backbone and head through inductor), and with ``--amp`` (mmengine's
TestLoop under bf16 autocast on CPU: before the scoring ops kept float32 under autocast, the
default reduction raised there), against mmseg's eager inference in this process.
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

from fatr_seg.datasets import write_dataset

REPO = Path(__file__).resolve().parents[2]
# A 4-block ViT with the default reduction at blocks 2 and 3, Segmenter's head on its compact
# output (the main configs' structure, tiny).
CONFIG = """
_base_ = [{base!r}]
crop_size = (64, 64)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        img_size=crop_size, embed_dims=32, num_layers=4, num_heads=2, drop_path_rate=0.0,
        reduction=dict(_delete_=True, method='fatr', layers=(2, 3)), compact_output=True),
    decode_head=dict(
        _delete_=True, type='FATRSegmenterHead', in_channels=32, channels=32, num_heads=2,
        embed_dims=32, num_layers=1, num_classes=9, dropout_ratio=0.0,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
"""


def _run(args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


@pytest.mark.slow
def test_compiled_test_run_gives_eager_predictions(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, num_train=1, num_val=3, size=64, seed=0, progress=False)
    config = tmp_path / "tiny.py"
    config.write_text(
        CONFIG.format(
            base=str(REPO / "configs" / "demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py")
        )
    )
    cfg = Config.fromfile(str(config))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    ckpt = tmp_path / "random.pth"
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), ckpt)
    options = [f"test_dataloader.dataset.data_root={data}", "test_dataloader.num_workers=0"]
    # Eager: mmseg's inference in this process, the label maps as IoUMetric saves them (+1);
    # tools/test.py --out gives the same in test_keep_ratio_tools.py.
    from mmseg.apis import inference_model, init_model

    model = init_model(cfg, str(ckpt), device="cpu")
    with torch.no_grad():
        preds = {
            "eager": {
                p.stem: inference_model(model, str(p)).pred_sem_seg.data[0].numpy() + 1
                for p in sorted((data / "images" / "validation").glob("*.jpg"))
            }
        }
    for mode, extra in (("compiled", ["--compile"]), ("amp", ["--amp"])):
        out = tmp_path / mode
        proc = _run(["tools/test.py", config, ckpt, "--work-dir", tmp_path / f"work_{mode}",
                     "--out", out, *extra, "--cfg-options", *options])  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        preds[mode] = {p.stem: np.array(Image.open(p)) for p in sorted(out.glob("*.png"))}
        compiled_log = "CompileInferenceHook: compiled" in proc.stdout + proc.stderr
        assert compiled_log == (mode == "compiled")
    assert len(preds["eager"]) == 3 and preds["eager"].keys() == preds["compiled"].keys()
    for name, eager in preds["eager"].items():
        assert np.array_equal(eager, preds["compiled"][name]), name
    # The random model's 9 class logits are near-tied almost everywhere: bf16 really ran (some
    # pixels move; 72 % agree when written) and is no garbage (most agree).
    assert preds["amp"].keys() == preds["eager"].keys()
    agree = np.mean([np.mean(e == preds["amp"][n]) for n, e in preds["eager"].items()])
    assert 0.5 < agree < 1.0, agree


def test_amp_sets_the_test_loop_fp16():
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("test_tool", REPO / "tools" / "test.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = Config.fromfile(str(REPO / "configs" / "fatr_ade20k.py"))
    args = argparse.Namespace(checkpoint=__file__, mode=None, keep_ratio=None, compile=False,
                              amp=True, out=None, show_dir=None)  # fmt: skip
    tool.configure(cfg, args)
    assert cfg.test_cfg.fp16 is True and cfg.test_cfg.type == "TestLoop"
