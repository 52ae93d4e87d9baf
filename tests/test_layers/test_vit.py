"""FATRVisionTransformer end to end against the naive reference forward (tests/reference.py)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import reference as ref
import torch
from torch.testing import assert_close

from fatr_seg.layers import FATRVisionTransformer
from fatr_seg.ops import window_ids

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBED, HEADS, DEPTH, PATCH = 48, 3, 6, 8
pytestmark = pytest.mark.usefixtures("single_thread")


def reduction(**overrides):
    """A reduction config with every key given (the reference does not read defaults)."""
    cfg = dict(method="fatr", layers=(2, 4, 5), keep_ratio=(0.7, 0.6, 0.8), windows=(2, 2, 1),
               score="exact", reweight="identity", restore="dc")  # fmt: skip
    cfg.update(overrides)
    return cfg


def build(red, grid=(5, 7), out_indices=(DEPTH - 1,), fused=None, seed=0, randomize=True):
    torch.manual_seed(seed)
    model = FATRVisionTransformer(
        img_size=(grid[0] * PATCH, grid[1] * PATCH), patch_size=PATCH, embed_dims=EMBED,
        num_layers=DEPTH, num_heads=HEADS, out_indices=out_indices, reduction=red,
        fused_attn=fused,
    )  # fmt: skip
    return (ref.randomize_(model, seed) if randomize else model).eval()


def ref_cfg(model, red):
    if red is not None:
        n = len(red["layers"])
        ratio = red["keep_ratio"]
        red = dict(red, keep_ratio=tuple(ratio) if isinstance(ratio, tuple) else (ratio,) * n)
    return dict(patch_size=PATCH, num_heads=HEADS, num_layers=DEPTH, pos_grid=model.pos_grid,
                out_indices=model.out_indices, final_norm=True, norm_eps=1e-6,
                reduction=red)  # fmt: skip


def images(B, size, seed):
    return torch.randn(B, 3, *size, generator=torch.Generator().manual_seed(seed))


def assert_no_near_ties(records):
    for recs in records:
        for r in recs:
            assert r.fold.margin > 1e-8, f"near-tie in the reference at layer {r.layer}: reseed"


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
CASES = [
    # (grid of the stored pos_embed, input size, reduction overrides, fused, B)
    ((5, 7), (40, 56), dict(), True, 2),
    ((5, 7), (40, 56), dict(restore="residual"), False, 2),
    ((5, 7), (45, 70), dict(restore="residual", reweight="paper"), True, 3),  # pad + interpolate
    ((5, 7), (40, 56), dict(reweight=None, windows=(3, 3, 1)), True, 1),
    ((4, 4), (24, 80), dict(windows=(4, 2, 2), keep_ratio=(0.5, 0.9, 0.5)), True, 3),
    ((23, 37), (92 * 2, 148 * 2), dict(), True, 1),  # 23x37 grid
    ((23, 37), (92 * 2, 148 * 2), dict(restore="residual", windows=(3, 3, 1)), True, 1),
]


@pytest.mark.parametrize("grid,size,overrides,fused,B", CASES)
def test_forward_matches_reference(grid, size, overrides, fused, B):
    red = reduction(**overrides)
    model = build(red, grid, out_indices=(0, 1, 3, 4, 5), fused=fused, seed=len(CASES))
    x = images(B, size, seed=B)

    with torch.no_grad():
        outs = model(x)
        traces = model.reduction_trace(x)
    want, records = ref.vit_forward(model.state_dict(), x, ref_cfg(model, red))
    assert_no_near_ties(records)

    H, W = -(-size[0] // PATCH), -(-size[1] // PATCH)
    assert len(outs) == len(want) == 5
    for got, exp in zip(outs, want, strict=True):
        assert got.shape == (B, EMBED, H, W)
        assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)
    assert [t.layer for t in traces] == list(red["layers"])
    for j, t in enumerate(traces):
        assert t.hw_shape == (H, W)
        for b in range(B):
            r = records[b][j]
            assert t.kept[b].tolist() == r.fold.kept
            assert t.lf_window[b].tolist() == r.lf_window
            assert t.source[b].tolist() == r.source
            assert_close(t.kept_scores[b].double(), torch.tensor(r.fold.kept_scores, dtype=ref.DT),
                         atol=1e-8, rtol=1e-5)  # fmt: skip
    _, state = model.forward_tokens(x, out_indices=(DEPTH - 1,))[0]
    for b in range(B):
        assert state.dc_count[b].tolist() == [float(c) for c in records[b][-1].dc_count]


def test_reference_without_reduction_matches_timm():
    """Anchors the reference itself (and the plain trunk) to timm's VisionTransformer."""
    timm = pytest.importorskip("timm")
    model = build(None, grid=(5, 7))
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=(40, 56), patch_size=PATCH, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS,
        num_classes=0,
    ).eval()  # fmt: skip
    vit.load_state_dict(model.state_dict(), strict=True)
    x = images(2, (40, 56), seed=0)
    with torch.no_grad():
        feats = vit.forward_features(x)[:, 1:].transpose(1, 2).reshape(2, EMBED, 5, 7)
        got = model(x)[0]
    want, _ = ref.vit_forward(model.state_dict(), x, ref_cfg(model, None))
    assert_close(got, feats, atol=1e-5, rtol=1e-5)
    assert_close(want[0], feats.double(), atol=1e-5, rtol=1e-5)


def test_fused_and_explicit_models_agree(monkeypatch):
    red = reduction(restore="residual")
    fused = build(red, fused=True, seed=3)
    monkeypatch.setenv("FATR_FUSED_ATTN", "0")
    explicit = build(red, fused=None, seed=3)
    assert all(not blk.attn.fused_attn for blk in explicit.blocks)
    x = images(2, (40, 56), seed=4)
    with torch.no_grad():
        assert_close(fused(x)[0], explicit(x)[0], atol=1e-5, rtol=1e-5)
        for a, b in zip(fused.reduction_trace(x), explicit.reduction_trace(x), strict=True):
            assert torch.equal(a.kept, b.kept) and torch.equal(a.source, b.source)


# ---------------------------------------------------------------------------------------------
# Identity: no token removed + reweight='identity' is the plain ViT
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(40, 56), (23 * PATCH, 37 * PATCH)])
def test_keep_all_with_identity_reweight_is_the_plain_vit(size):
    plain = build(None, seed=5, out_indices=(1, 3, 5))
    red = FATRVisionTransformer(
        img_size=(40, 56), patch_size=PATCH, embed_dims=EMBED, num_layers=DEPTH, num_heads=HEADS,
        out_indices=(1, 3, 5), reduction=reduction(keep_ratio=1.0),
    ).eval()  # fmt: skip
    missing, unexpected = red.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(
        [f"blocks.{i}.attn.omega{j}" for i in (2, 3, 4, 5) for j in (1, 2)]
        + [f"blocks.{i}.reducer.dc_pos" for i in (1, 3, 4)]
    )
    x = images(2, size, seed=6)
    with torch.no_grad():
        for a, b in zip(plain(x), red(x), strict=True):
            assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_identity_reweight_at_init_is_plain_attention_with_dc_tokens():
    """With tokens folded, 'identity' at init equals reweight=None (same weights, same DC)."""
    rew = build(reduction(reweight="identity"), randomize=False, seed=7)
    none = build(reduction(reweight=None), randomize=False, seed=7)
    none.load_state_dict(rew.state_dict(), strict=False)
    x = images(2, (40, 56), seed=8)
    with torch.no_grad():
        assert_close(rew(x)[0], none(x)[0], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("restore", ["dc", "residual"])
def test_gradients_reach_omegas_dc_pos_and_every_token(restore):
    red = reduction(restore=restore)
    model = build(red, seed=9, out_indices=(5,)).train()
    captured = []

    def grab(module, args):
        args[0].retain_grad()
        captured.append((args[0], args[2]))  # the sequence before the fold, and its state

    hooks = [blk.reducer.register_forward_pre_hook(grab) for blk in model.blocks if blk.reducer]
    x = images(2, (40, 56), seed=10).requires_grad_(True)
    weight = torch.randn(2, EMBED, 5, 7, generator=torch.Generator().manual_seed(0))
    (model(x)[0] * weight).sum().backward()
    for h in hooks:
        h.remove()

    named = dict(model.named_parameters())
    for i in (2, 3, 4, 5):  # every block after the first reduction
        for j in (1, 2):
            g = named[f"blocks.{i}.attn.omega{j}"].grad
            assert g is not None and (g != 0).all() and g.isfinite().all(), (i, j)
    for i in (1, 3, 4):
        g = named[f"blocks.{i}.reducer.dc_pos"].grad
        assert g is not None and g.isfinite().all()
        assert (g.abs().sum(-1) > 0).all(), i  # every window is populated on a 5x7 grid
    assert len(captured) == 3
    for seq, state in captured:
        grad = seq.grad  # (B, 1 + M + D, C): CLS, patch tokens (kept or folded), DC tokens
        M = state.num_patches
        assert (grad[:, : 1 + M].abs().sum(-1) > 0).all()
        dc_grad = grad[:, 1 + M :].abs().sum(-1)
        assert (dc_grad[state.dc_count > 0] > 0).all()
    assert (x.grad.abs().sum(1) > 0).all()


def test_parameter_gradients_match_reference():
    red = reduction(restore="residual", windows=(2, 2, 1))
    model = build(red, seed=11, out_indices=(3, 5))
    x = images(2, (40, 56), seed=12)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(2, EMBED, 5, 7, generator=gen) for _ in range(2)]
    sum(((o * w).sum() for o, w in zip(model(x), weights, strict=True))).backward()

    names = ["blocks.2.attn.omega1", "blocks.4.attn.omega2", "blocks.5.attn.omega2",
             "blocks.1.reducer.dc_pos", "blocks.3.reducer.dc_pos", "blocks.4.reducer.dc_pos",
             "blocks.3.attn.qkv.weight", "pos_embed"]  # fmt: skip
    sd = {k: v.detach().double().requires_grad_(k in names) for k, v in model.state_dict().items()}
    want, records = ref.vit_forward(sd, x, ref_cfg(model, red))
    assert_no_near_ties(records)
    sum(((o * w.double()).sum() for o, w in zip(want, weights, strict=True))).backward()
    params = dict(model.named_parameters())
    for name in names:
        scale = sd[name].grad.abs().max().item()
        assert scale > 0, name
        assert_close(params[name].grad.double(), sd[name].grad, atol=1e-5 * scale, rtol=1e-4,
                     msg=name)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Batch independence
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,windows", [((5, 7), (2, 2, 1)), ((3, 5), (3, 3, 1))])
def test_image_outputs_do_not_depend_on_the_rest_of_the_batch(grid, windows):
    model = build(reduction(windows=windows, restore="residual"), grid=grid, seed=13,
                  out_indices=(1, 5))  # fmt: skip
    size = (grid[0] * PATCH, grid[1] * PATCH)
    a, others = images(1, size, seed=14), images(4, size, seed=15)
    with torch.no_grad():
        alone = model(a)
        batch1 = model(torch.cat([a, others[:2]]))
        batch2 = model(torch.cat([a, others[2:]]))
        traces = [model.reduction_trace(t) for t in (a, torch.cat([a, others[:2]]))]
        _, state = model.forward_tokens(torch.cat([a, others[:2]]), out_indices=(2,))[0]
    for o, p, q in zip(alone, batch1, batch2, strict=True):
        assert_close(p[:1], o, atol=1e-5, rtol=1e-5)  # GEMM blocking may vary with B
        assert_close(q[:1], o, atol=1e-5, rtol=1e-5)
    for t_alone, t_batch in zip(*traces, strict=True):
        assert torch.equal(t_alone.kept[0], t_batch.kept[0])
        assert torch.equal(t_alone.source[0], t_batch.source[0])
    if grid == (3, 5):  # the case where images differ in which DC windows are still empty
        empty = state.dc_count == 0
        assert empty.any() and not empty.all(dim=1).all()
        assert (empty != empty[:1]).any()


# ---------------------------------------------------------------------------------------------
# reduction_trace
# ---------------------------------------------------------------------------------------------
def test_reduction_trace_is_consistent():
    red = reduction(windows=(3, 3, 1), keep_ratio=(0.7, 0.7, 0.7))
    model = build(red, grid=(9, 11), seed=16)
    B, (H, W) = 3, (9, 11)
    N = H * W
    x = images(B, (H * PATCH, W * PATCH), seed=17)
    traces = model.reduction_trace(x)
    assert len(traces) == 3
    M_prev, kept_prev = N, None
    for t, w in zip(traces, red["windows"], strict=True):
        K = ref.num_keep(0.7, M_prev)
        assert t.kept.shape == t.kept_scores.shape == (B, K)
        assert t.lf_window.shape == t.source.shape == (B, N)
        assert (t.kept.diff(dim=1) > 0).all()  # ascending, no repeats
        hf = t.lf_window == -1
        assert (hf.sum(1) == K).all()
        assert (hf.gather(1, t.kept)).all()
        wid = window_ids((H, W), w).expand(B, N)
        assert torch.equal(t.lf_window[~hf], wid[~hf])  # LF patches sit in their window
        # Source: HF patches point at their position, LF patches at the DC token of their window.
        pos = torch.full((B, N), -1, dtype=torch.long)
        pos.scatter_(1, t.kept, torch.arange(K).expand(B, K))
        assert torch.equal(t.source[hf], pos[hf])
        assert torch.equal(t.source[~hf], (K + wid)[~hf])
        counts = torch.stack([torch.bincount(r[r >= 0], minlength=w * w) for r in t.lf_window])
        assert (counts.sum(1) + K == N).all()
        if kept_prev is not None:  # HF sets shrink: a folded patch never comes back
            assert torch.isin(t.kept, kept_prev).all()
        assert t.kept_scores.isfinite().all() and (t.kept_scores > 0).all()
        M_prev, kept_prev = K, t.kept
    _, state = model.forward_tokens(x, out_indices=(DEPTH - 1,))[0]
    assert torch.equal(state.source, traces[-1].source)
    assert torch.equal(state.patch_idx, traces[-1].kept)
    assert state.dc_count.sum(1).tolist() == [float(N - traces[-1].kept.shape[1])] * B


def test_plain_model_has_no_trace():
    model = build(None, seed=0)
    assert model.reduction_trace(images(1, (40, 56), seed=0)) == []


# ---------------------------------------------------------------------------------------------
# Import boundary
# ---------------------------------------------------------------------------------------------
def test_ops_and_layers_do_not_import_openmmlab():
    code = textwrap.dedent(
        """
        import sys
        import fatr_seg.ops, fatr_seg.layers
        bad = sorted(m for m in sys.modules
                     if m.split(".")[0] in ("mmseg", "mmengine", "mmcv"))
        assert not bad, bad
        assert "fatr_seg.models" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
