"""FATRViT as mmseg builds it: restoration invariants, the keep-all baseline, training gradients."""

import math
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg.utils import register_all_modules
from tiny_configs import tiny_overrides
from tiny_segmentors import randomize_
from torch.testing import assert_close

from fatr_seg.models import FATRViT
from fatr_seg.ops import num_keep, window_ids

register_all_modules()
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EMBED, HEADS, DEPTH, PATCH = 48, 3, 6, 8
LAYERS, RATIOS, WINDOWS = (2, 4, 5), (0.6, 0.7, 0.8), (2, 2, 1)
# The main config shrunk the way `--cfg-options` would (reduction layers moved into 6 blocks).
TINY = {
    **tiny_overrides(EMBED, HEADS, DEPTH, PATCH, num_classes=9),
    "model.backbone.drop_path_rate": 0.0,
    "model.backbone.init_cfg": None,
}


def tiny_config(name="fatr_ade20k.py", **options):
    cfg = Config.fromfile(str(CONFIGS / name))
    cfg.merge_from_dict({**TINY, **options})
    return cfg


def build(restore="dc", out_indices=(0, 2, 4, DEPTH - 1), seed=0, **reduction):
    reduction = dict(layers=LAYERS, keep_ratio=RATIOS, windows=WINDOWS, restore=restore,
                     **reduction)  # fmt: skip
    model = MODELS.build(dict(type="FATRViT", img_size=64, patch_size=PATCH, embed_dims=EMBED,
                              num_layers=DEPTH, num_heads=HEADS, out_indices=out_indices,
                              reduction=reduction))  # fmt: skip
    assert isinstance(model, FATRViT)
    return randomize_(model, seed, other=0.5).eval()


def images(B, size, seed=0):
    return torch.randn(B, 3, *size, generator=torch.Generator().manual_seed(seed))


def as_tokens(feature_map):
    """(B, C, H, W) -> (B, H·W, C) in patch (row-major) order."""
    return feature_map.flatten(2).transpose(1, 2)


def take(x, idx):
    """x (B, n, C) at idx (B, k) -> (B, k, C)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------
# Restoration invariants


@torch.no_grad()
@pytest.mark.parametrize("size", [(56, 72), (64, 64), (45, 70)])  # 7x9, 8x8, 6x9 (padded)
def test_dc_restoration_invariants(size):
    """Every output map: HF positions hold the final HF tokens exactly, LF ones their DC token."""
    model = build("dc")
    x = images(2, size)
    maps = model(x)
    pairs = model.forward_tokens(x)
    traces = model.reduction_trace(x)
    H, W = math.ceil(size[0] / PATCH), math.ceil(size[1] / PATCH)
    assert [t.layer for t in traces] == list(LAYERS)

    M = H * W
    expected_m = {}
    for layer, ratio in zip(LAYERS, RATIOS):
        M = num_keep(ratio, M)
        expected_m[layer] = M
    for fmap, (seq, state), index in zip(maps, pairs, model.out_indices, strict=True):
        assert fmap.shape == (2, EMBED, H, W)
        grid = as_tokens(fmap)
        if index == DEPTH - 1:  # final norm on the last block only, as mmseg's ViT
            seq = model.norm(seq)
        done = [t for t in traces if t.layer <= index + 1]
        M = state.num_patches
        assert M == (expected_m[done[-1].layer] if done else H * W)
        # HF: exactly the final HF tokens at their original positions (= the last trace's kept).
        if done:
            assert torch.equal(state.patch_idx, done[-1].kept)
        hf = take(grid, state.patch_idx)
        if index == DEPTH - 1:
            assert_close(hf, seq[:, 1 : 1 + M], rtol=0, atol=1e-6)
        else:
            assert torch.equal(hf, seq[:, 1 : 1 + M])
        if not done:
            continue
        # LF: each position equals the DC token of the spatial window that contains it.
        win = window_ids((H, W), state.dc_grid[1])
        lf = torch.ones(2, H * W, dtype=torch.bool).scatter(1, state.patch_idx, False)
        assert lf.sum() == 2 * (H * W - M) > 0
        assert torch.equal(done[-1].group[lf], M + win.expand(2, -1)[lf])
        dc_of_each = take(seq, 1 + M + win.expand(2, -1))
        assert_close(grid[lf], dc_of_each[lf], rtol=0, atol=1e-6)


@torch.no_grad()
def test_outputs_before_the_first_reduction_are_the_plain_vit():
    model = build("dc")
    plain = MODELS.build(dict(type="FATRViT", img_size=64, patch_size=PATCH, embed_dims=EMBED,
                              num_layers=DEPTH, num_heads=HEADS, out_indices=(0,),
                              reduction=None)).eval()  # fmt: skip
    missing = plain.load_state_dict(model.state_dict(), strict=False).unexpected_keys
    assert missing and all(k.endswith(("omega1", "omega2", "dc_pos")) for k in missing)
    x = images(2, (56, 72), seed=1)
    assert torch.equal(model(x)[0], plain(x)[0])


@torch.no_grad()
def test_residual_restoration_invariants():
    """'residual': HF positions are still exact; LF ones are their DC token plus their residual."""
    model = build("residual", out_indices=(DEPTH - 1,))
    x = images(2, (56, 72), seed=2)
    (fmap,) = model(x)
    ((seq, state),) = model.forward_tokens(x)
    grid, M, H, W = as_tokens(fmap), state.num_patches, 7, 9
    assert_close(take(grid, state.patch_idx), model.norm(seq[:, 1 : 1 + M]), rtol=0, atol=1e-6)
    residual = state.residual
    assert torch.equal(take(residual, state.patch_idx), torch.zeros_like(seq[:, 1 : 1 + M]))
    # (DC aggregation leaves kept tokens unchanged, so their patches carry no residual.)
    lf = torch.ones(2, H * W, dtype=torch.bool).scatter(1, state.patch_idx, False)
    win = window_ids((H, W), state.dc_grid[1]).expand(2, -1)
    expected = model.norm(take(seq, 1 + M + win) + residual)
    assert_close(grid[lf], expected[lf], rtol=0, atol=1e-5)
    # Unlike 'dc', positions sharing a DC token differ (their own removed features survive).
    assert (grid[lf] - grid[lf].mean(0)).abs().amax() > 0.1
    dc = build("dc", out_indices=(DEPTH - 1,))
    assert not torch.allclose(grid[lf], as_tokens(dc(x)[0])[lf], atol=1e-2)


@torch.no_grad()
@pytest.mark.parametrize("restore, score", [("dc", "exact"), ("residual", "logit_proxy")])
def test_keep_all_equals_the_baseline_config(restore, score):
    """keep_ratio=1.0 in the main config = the baseline config with the same weights."""
    out = {"model.backbone.out_indices": (1, 3, 5), "model.backbone.compact_output": False}
    reduction = {"model.backbone.reduction.layers": LAYERS,
                 "model.backbone.reduction.keep_ratio": 1.0,
                 "model.backbone.reduction.restore": restore,
                 "model.backbone.reduction.score": score}  # fmt: skip
    reduced = MODELS.build(tiny_config(**out, **reduction).model.backbone).eval()
    base = tiny_config("baseline_vit-s_ade20k.py", **out).model.backbone
    assert base.reduction is None
    base = randomize_(MODELS.build(base), seed=3, other=0.5).eval()
    result = reduced.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(
        k.endswith(("omega1", "omega2", "dc_pos")) for k in result.missing_keys
    )
    x = images(2, (56, 72), seed=4)
    got, expected = reduced(x), base(x)
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A small segmentor from the main config: forward and backward


@pytest.mark.parametrize("restore", ["copy", "residual"])
@pytest.mark.parametrize("method", ["fatr", "fatr_paper"])
def test_segmentor_from_config_trains(restore, method):
    """``model.loss`` on random input; every trainable parameter gets a non-zero gradient."""
    red = dict(method=method, layers=LAYERS, restore=restore, _delete_=True)
    if method == "fatr_paper":
        red["windows"] = WINDOWS
    cfg = tiny_config(**{"model.backbone.reduction": red,
                         "model.backbone.compact_output": restore == "copy"})  # fmt: skip
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    gen = torch.Generator().manual_seed(5)
    inputs = torch.randn(2, 3, 64, 64, generator=gen)
    samples = []
    for _ in range(2):
        label = torch.randint(0, 9, (1, 64, 64), generator=gen)
        label[:, :4] = 255  # some ignored pixels, as reduce_zero_label makes
        sample = SegDataSample(gt_sem_seg=PixelData(data=label))
        sample.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(sample)
    losses = model.loss(inputs, samples)
    loss = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.endswith("omega1") for n, _ in trainable)
    dc = method == "fatr_paper"  # DC tokens: omega2 and DC positional terms, else none
    assert any(n.endswith("omega2") for n, _ in trainable) == dc
    assert any(n.endswith("dc_pos") for n, _ in trainable) == dc
    no_grad = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient reached {no_grad}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
