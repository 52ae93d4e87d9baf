"""Odd inputs through the whole mmseg segmentor, and inputs and configs that must be rejected.

The segmentor is ``configs/fatr_ade20k.py`` (Segmenter-Mask head) shrunk to 4 blocks of width 32
(patch 16), built through mmseg's registry exactly as ``tools/train.py`` builds it. See
``docs/limits.md`` for the behaviour each test pins down.
"""

import math
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
# Tiny models: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")
NUM_CLASSES, DEPTH, PATCH = 9, 4, 16

register_all_modules()


@pytest.fixture(scope="module")
def base_cfg():
    return Config.fromfile(str(REPO / "configs" / "fatr_ade20k.py"))


def model_cfg(base_cfg, reduction=None, test_cfg=None, **backbone):
    # These tests read the backbone's full-grid maps; the compact path (the config's default) is
    # tested against them in test_segmenter_head.py.
    backbone.setdefault("compact_output", False)
    cfg = base_cfg.model.copy()
    cfg.backbone = dict(cfg.backbone, img_size=(64, 64), embed_dims=32, num_layers=DEPTH,
                        num_heads=2, drop_path_rate=0.0, init_cfg=None,
                        # The machinery under the late preset (its DC and merge paths); the
                        # config's default is one case of the size tests.
                        reduction={"method": "fatr", "layers": (2, 3, 4), **(reduction or {})},
                        **backbone)  # fmt: skip
    cfg.decode_head = dict(cfg.decode_head, in_channels=32, channels=32, num_heads=2,
                           embed_dims=32, num_layers=1, num_classes=NUM_CLASSES)  # fmt: skip
    cfg.test_cfg = test_cfg or dict(mode="whole")
    return cfg


def build(base_cfg, seed=0, **kwargs):
    torch.manual_seed(seed)
    return MODELS.build(model_cfg(base_cfg, **kwargs)).eval()


def image(hw, seed=0):
    """A uint8-valued (3, H, W) float image, as LoadImageFromFile + PackSegInputs give."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *hw), generator=gen).float()


def predict(model, img):
    hw = tuple(img.shape[1:])
    sample = SegDataSample(metainfo=dict(ori_shape=hw, img_shape=hw, pad_shape=hw))
    with torch.no_grad():
        return model.test_step(dict(inputs=[img], data_samples=[sample]))[0]


def backbone_states(backbone, x):
    """``(tokens, state)`` after every block, and the traces of the reduction layers."""
    traces = []
    with torch.no_grad():
        outs = backbone.forward_tokens(x, out_indices=tuple(range(DEPTH)), traces=traces)
    return outs, traces


# ---------------------------------------------------------------------------------------------
# Image sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(100, 150), (150, 100), (64, 48), (17, 33), (16, 48)])
@pytest.mark.parametrize("method", ["fatr", "default"])
def test_predict_returns_the_original_size(base_cfg, hw, method):
    default = {**base_cfg.model.backbone.reduction, "layers": (2, 3, 4)}
    model = build(base_cfg, reduction=default if method == "default" else None)
    out = predict(model, image(hw))
    assert out.seg_logits.data.shape == (NUM_CLASSES, *hw)
    assert out.pred_sem_seg.data.shape == (1, *hw)
    assert torch.isfinite(out.seg_logits.data).all()


def test_partial_patches_are_padded_not_dropped(base_cfg):
    """100×150 is not a multiple of 16: the grid is ceil(100/16)×ceil(150/16) = 7×10, and the
    last 4 rows / 6 columns (a partial patch) reach the prediction instead of being cut off."""
    model = build(base_cfg)
    img = image((100, 150))
    x = model.data_preprocessor(dict(inputs=[img], data_samples=None), False)["inputs"]
    (feat,) = model.extract_feat(x)
    assert feat.shape[-2:] == (math.ceil(100 / PATCH), math.ceil(150 / PATCH))
    base = predict(model, img).seg_logits.data
    for rows, cols in ((slice(96, 100), slice(None)), (slice(None), slice(144, 150))):
        changed = img.clone()
        changed[:, rows, cols] = 255 - changed[:, rows, cols]
        diff = (predict(model, changed).seg_logits.data - base).abs().amax()
        assert diff > 1e-4, f"pixels {rows}, {cols} did not reach the prediction"


def test_windows_larger_than_the_grid_stay_empty_and_masked(base_cfg):
    """16×48 gives a 1×3 grid; windows (2, 2, 1) ask for 2×2 DC windows. The bottom row of
    windows receives no token: count 0, no NaN, valid logits."""
    model = build(base_cfg, reduction=dict(keep_ratio=0.5, windows=(2, 2, 1)))
    x = torch.randn(2, 3, 16, 48, generator=torch.Generator().manual_seed(0))
    outs, traces = backbone_states(model.backbone, x)
    assert traces[0].hw_shape == (1, 3)
    for trace in traces[:2]:  # 2×2 windows: only windows 0 and 1 lie on the single grid row
        M = trace.kept.shape[1]
        used = trace.group[trace.group >= 0] - M  # DC token -> its window
        assert used.numel() > 0 and set(used.tolist()) <= {0, 1}
    state = outs[2][1]  # after block 3: two 2×2 reductions
    assert state.dc_grid == ("side", 2)
    assert (state.dc_count[:, 2:] == 0).all() and (state.dc_count[:, :2].sum(1) > 0).all()
    assert state.dc_count.sum(1).add(state.num_patches).eq(3).all()
    assert all(torch.isfinite(tokens).all() for tokens, _ in outs)
    logits = predict(model, image((16, 48))).seg_logits.data
    assert logits.shape == (NUM_CLASSES, 16, 48) and torch.isfinite(logits).all()


def test_empty_windows_take_no_attention(base_cfg):
    """Reduce at block 2 only (blocks 3-4 plain until the last), output block 3: its attention sees
    the empty windows' DC tokens, which hold only their positional term. Changing that term must
    change nothing, because the windows are masked out of attention and restore onto no pixel."""
    model = build(base_cfg, reduction=dict(layers=(2, 4), keep_ratio=0.5, windows=(2, 1)),
                  out_indices=(2,))  # fmt: skip
    x = torch.randn(2, 3, 16, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ((tokens, state),) = model.backbone.forward_tokens(x)
        assert state.num_dc == 4 and (state.dc_count[:, 2:] == 0).all()
        (ref,) = model.backbone(x)
        model.backbone.blocks[1].reducer.dc_pos[2:] = 1e3 * torch.randn(2, 32)
        (out,) = model.backbone(x)
        model.backbone.blocks[1].reducer.dc_pos[:2] += 1.0  # populated windows do matter
        (moved,) = model.backbone(x)
    assert torch.isfinite(out).all()
    assert_close(out, ref, rtol=0, atol=0)
    assert (moved - ref).abs().max() > 1e-3


def test_empty_windows_do_not_influence_the_output(base_cfg):
    """An empty window holds only its positional term; changing it must change nothing."""
    model = build(base_cfg, reduction=dict(keep_ratio=0.5, windows=(2, 2, 1)))
    x = torch.randn(2, 3, 16, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.backbone(x)[0]
        for i in (1, 2):  # the reducers of blocks 2 and 3 (2×2 windows; 2 and 3 stay empty)
            model.backbone.blocks[i].reducer.dc_pos[2:] = 1e3 * torch.randn(2, 32)
        out = model.backbone(x)[0]
    assert torch.isfinite(out).all()
    assert_close(out, ref, rtol=0, atol=0)


def test_budget_equal_to_all_tokens(base_cfg):
    """2×2 grid (M = 4). Block 2: ceil(0.9·4) = 4 = M and no DC tokens yet, so the layer is a
    no-op. Block 3 keeps 2. Block 4: ceil(1.0·2) = M again, but the DC grid shrinks 2×2 → 1×1,
    so the DC tokens merge by count while every HF token stays."""
    model = build(base_cfg, reduction=dict(keep_ratio=(0.9, 0.5, 1.0), windows=(2, 2, 1)))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outs, traces = backbone_states(model.backbone, x)
    (x1, s1), (x2, s2), (x3, s3), (x4, s4) = outs
    assert x2.shape == x1.shape and s2.num_dc == 0  # no-op: nothing added, nothing removed
    assert (traces[0].kept == torch.arange(4)).all() and (traces[0].group == -1).all()
    assert s3.num_patches == 2 and s3.num_dc == 4 and s3.dc_count.sum(1).eq(2).all()
    assert s4.num_patches == 2 and s4.num_dc == 1 and s4.dc_count.eq(2).all()
    assert (traces[2].kept == traces[1].kept).all()  # block 4 kept every HF token
    assert x4.shape == (3, 1 + 2 + 1, 32) and torch.isfinite(x4).all()


def test_a_layer_keeping_a_single_token_trains(base_cfg):
    """keep_ratio 0.01 on a 3×5 grid keeps ceil(0.15) = 1 token at every reduction layer; a
    training step on it (batch size 1) gives a finite loss and finite gradients.

    Block 3 then keeps its single token with the DC grid unchanged (2×2), so it is a no-op and
    its ``dc_pos`` takes no part in the graph (see docs/limits.md on DDP).
    """
    model = build(base_cfg, reduction=dict(keep_ratio=0.01, windows=(2, 2, 1))).train()
    x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(2))
    _, traces = backbone_states(model.backbone, x)
    assert [tuple(t.kept.shape) for t in traces] == [(1, 1)] * 3
    labels = torch.randint(0, NUM_CLASSES, (1, 48, 80), generator=torch.Generator().manual_seed(3))
    labels[:, :4] = 255  # some ignored pixels
    check_training_step(model, x, labels, unused={"backbone.blocks.2.reducer.dc_pos"})


def check_training_step(model, x, labels, unused=()):
    from mmengine.structures import PixelData

    hw = tuple(x.shape[-2:])
    samples = []
    for label in labels:
        sample = SegDataSample(metainfo=dict(ori_shape=hw, img_shape=hw, pad_shape=hw))
        sample.gt_sem_seg = PixelData(data=label[None])
        samples.append(sample)
    model.zero_grad()
    losses = model.loss(x, samples)
    loss = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = {name for name, p in model.named_parameters() if p.grad is None}
    assert no_grad == set(unused)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    return loss


@pytest.mark.parametrize("hw", [(50, 70), (64, 64)])
def test_batch_size_one_training_step(base_cfg, hw):
    model = build(base_cfg).train()
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(4))
    labels = torch.randint(0, NUM_CLASSES, (1, *hw), generator=torch.Generator().manual_seed(5))
    check_training_step(model, x, labels)


# ---------------------------------------------------------------------------------------------
# Slide inference
# ---------------------------------------------------------------------------------------------
# Crop 64, stride 48. mmseg moves the last crop back inside the image; an image shorter than the
# crop gives shorter crops (50×64 here), which the backbone pads to whole patches.
SLIDE_CASES = [
    ((50, 150), [(0, 50)], [(0, 64), (48, 112), (86, 150)]),
    ((100, 150), [(0, 64), (36, 100)], [(0, 64), (48, 112), (86, 150)]),
]


@pytest.mark.parametrize("hw,row_crops,col_crops", SLIDE_CASES)
def test_slide_inference_with_border_crops(base_cfg, hw, row_crops, col_crops):
    """The stitched logits are the mean of the per-crop logits over the crops covering a pixel."""
    model = build(base_cfg, test_cfg=dict(mode="slide", crop_size=(64, 64), stride=(48, 48)))
    img = image(hw, seed=6)
    out = predict(model, img).seg_logits.data
    assert out.shape == (NUM_CLASSES, *hw) and torch.isfinite(out).all()

    x = model.data_preprocessor(dict(inputs=[img], data_samples=None), False)["inputs"]
    total = torch.zeros(NUM_CLASSES, *hw)
    count = torch.zeros(1, *hw)
    for y1, y2 in row_crops:
        for x1, x2 in col_crops:
            crop = x[:, :, y1:y2, x1:x2]
            meta = dict(img_shape=crop.shape[2:], ori_shape=hw)  # as slide_inference sets it
            with torch.no_grad():
                logits = model.encode_decode(crop, [meta])[0]
            assert logits.shape == (NUM_CLASSES, y2 - y1, x2 - x1)
            total[:, y1:y2, x1:x2] += logits
            count[:, y1:y2, x1:x2] += 1
    assert (count > 0).all()
    assert_close(out, total / count, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_rejected_at_the_backbone_entry(base_cfg, value):
    model = build(base_cfg)
    x = torch.randn(2, 3, 64, 64)
    x[1, 2, 10, 20] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.backbone(x)
    img = image((64, 64))
    img[0, 3, 3] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        predict(model, img)


def test_non_finite_input_passes_through_when_the_check_is_off(base_cfg):
    model = build(base_cfg, check_finite=False)
    x = torch.randn(1, 3, 64, 64)
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        (out,) = model.backbone(x)
    assert torch.isnan(out).any()


INVALID_REDUCTIONS = [
    (dict(layers=(2, 5), windows=(2, 1)), "reduction.layers"),  # beyond the 4 blocks
    (dict(layers=(0, 2), windows=(2, 1)), "reduction.layers"),  # 1-indexed
    (dict(layers=(3, 2), windows=(2, 1)), "reduction.layers"),  # unsorted
    (dict(layers=(2, 2), windows=(2, 1)), "reduction.layers"),  # repeated
    (dict(keep_ratio=0.0), "reduction.keep_ratio"),
    (dict(keep_ratio=1.5), "reduction.keep_ratio"),
    (dict(keep_ratio=-0.2), "reduction.keep_ratio"),
    (dict(keep_ratio=(0.5, 0.5)), "reduction.keep_ratio"),  # 3 layers
    (dict(windows=(2, 1)), "reduction.windows"),  # 3 layers
    (dict(windows=(3, 2, 1)), "reduction.windows"),  # 2 does not divide 3
    (dict(windows=(2, 0, 0)), "reduction.windows"),
    (dict(method="bogus"), "reduction.method"),
    (dict(score="bogus"), "reduction.score"),
    (dict(reweight="bogus"), "reduction.reweight"),
    (dict(restore="bogus"), "reduction.restore"),
    (dict(keep=0.5), "unknown key.*'keep'"),
]


@pytest.mark.parametrize("reduction,message", INVALID_REDUCTIONS)
def test_invalid_reduction_fails_at_build_naming_the_key(base_cfg, reduction, message):
    with pytest.raises(ValueError, match=message):
        MODELS.build(model_cfg(base_cfg, reduction=reduction))
