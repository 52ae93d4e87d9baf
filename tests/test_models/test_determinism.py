"""Eval-mode outputs are bitwise identical across runs with the same seed.

Two fresh builds of the segmentor from the config with the same seed, two calls of one model, and
a separate Python process (other hash seed) must all give the same logits and the same token
selection. Dropout and stochastic depth are switched on in the config, so eval mode must switch
them off. The ``'random'`` reduction method is the exception: it draws its selection from torch's
global generator (see docs/limits.md).
"""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg.utils import register_all_modules
from torch.testing import assert_close

import fatr_seg.models  # noqa: F401  (registers FATRViT)

REPO = Path(__file__).resolve().parents[2]
# Tiny models: one intra-op thread (see tests/conftest.py), also in the determinism checks.
pytestmark = pytest.mark.usefixtures("single_thread")
register_all_modules()

# A pure-torch trunk, built and run the same way here and in a subprocess.
TRUNK = """
import torch
from fatr_seg.layers import FATRVisionTransformer

def run():
    torch.manual_seed(0)
    model = FATRVisionTransformer(
        img_size=(48, 80), patch_size=8, embed_dims=48, num_layers=5, num_heads=3,
        drop_rate=0.1, drop_path_rate=0.2, out_indices=(2, 4),
        reduction=dict(layers=(2, 4), keep_ratio=0.6, windows=(2, 1)),
    ).eval()
    x = torch.randn(2, 3, 45, 70, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = model(x)
        kept = [t.kept for t in model.reduction_trace(x)]
    return outs, kept
"""


@pytest.fixture(scope="module")
def base_cfg():
    return Config.fromfile(str(REPO / "configs" / "fatr_ade20k.py"))


def build(base_cfg, seed):
    cfg = copy.deepcopy(base_cfg.model)
    cfg.backbone.update(img_size=(64, 64), embed_dims=32, num_layers=4, num_heads=2,
                        drop_rate=0.1, drop_path_rate=0.3, init_cfg=None,
                        compact_output=False)  # fmt: skip
    cfg.backbone.reduction.update(layers=(2, 3, 4))
    cfg.decode_head.update(in_channels=32, channels=32, num_heads=2, embed_dims=32,
                           num_layers=1, num_classes=9, dropout_ratio=0.1)  # fmt: skip
    cfg.test_cfg = dict(mode="slide", crop_size=(64, 64), stride=(48, 48))
    torch.manual_seed(seed)
    return MODELS.build(cfg).eval()


def predict(model):
    img = torch.randint(0, 256, (3, 75, 130), generator=torch.Generator().manual_seed(2)).float()
    sample = SegDataSample(metainfo=dict(ori_shape=(75, 130), img_shape=(75, 130)))
    with torch.no_grad():
        out = model.test_step(dict(inputs=[img], data_samples=[sample]))[0]
    x = model.data_preprocessor(dict(inputs=[img], data_samples=None), False)["inputs"]
    kept = [t.kept for t in model.backbone.reduction_trace(x)]
    return out.seg_logits.data, kept


def test_two_builds_with_the_same_seed_predict_identically(base_cfg):
    a, b = build(base_cfg, seed=0), build(base_cfg, seed=0)
    assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    logits_a, kept_a = predict(a)
    logits_b, kept_b = predict(b)
    logits_a2, _ = predict(a)
    assert_close(logits_a, logits_b, rtol=0, atol=0)
    assert_close(logits_a, logits_a2, rtol=0, atol=0)  # dropout and drop path are off in eval
    for ka, kb in zip(kept_a, kept_b, strict=True):
        assert torch.equal(ka, kb)
    # ...and the seed matters: another seed gives other weights and other logits.
    other, _ = predict(build(base_cfg, seed=1))
    assert (other - logits_a).abs().max() > 1e-3


def test_dropout_is_active_in_train_mode_so_the_eval_check_has_teeth(base_cfg):
    model = build(base_cfg, seed=0).train()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model.backbone(x)[0], model.backbone(x)[0]
    assert (a - b).abs().max() > 1e-4


@pytest.mark.slow
def test_a_separate_process_gives_bitwise_identical_outputs(tmp_path):
    scope = {}
    exec(TRUNK, scope)  # noqa: S102  (the same source the subprocess runs)
    outs, kept = scope["run"]()
    script = tmp_path / "run.py"
    script.write_text(
        TRUNK
        + textwrap.dedent(f"""
        torch.set_num_threads(1)
        outs, kept = run()
        torch.save(dict(outs=outs, kept=kept), {str(tmp_path / "out.pt")!r})
        """)
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, str(script)], check=True, env=env, cwd=tmp_path, timeout=300)
    other = torch.load(tmp_path / "out.pt")
    assert_close(other["outs"], outs, rtol=0, atol=0)
    for ka, kb in zip(other["kept"], kept, strict=True):
        assert torch.equal(ka, kb)
