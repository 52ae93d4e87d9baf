"""FATRVisionTransformer end to end against the naive reference forward (tests/reference.py)."""

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import reference as ref
import torch
from torch.testing import assert_close

from fatr_seg.layers import FATRVisionTransformer, ReductionConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBED, HEADS, DEPTH, PATCH = 48, 3, 6, 8
pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = dict(layers=(2, 4, 5), keep_ratio=(0.7, 0.6, 0.8))


def build(red, grid=(5, 7), out_indices=(DEPTH - 1,), fused=None, seed=0, randomize=True):
    torch.manual_seed(seed)
    model = FATRVisionTransformer(
        img_size=(grid[0] * PATCH, grid[1] * PATCH), patch_size=PATCH, embed_dims=EMBED,
        num_layers=DEPTH, num_heads=HEADS, out_indices=out_indices, reduction=red,
        fused_attn=fused,
    )  # fmt: skip
    return (ref.randomize_(model, seed) if randomize else model).eval()


def ref_cfg(model):
    red = None if model.reduction is None else dataclasses.asdict(model.reduction)
    return dict(patch_size=PATCH, num_heads=HEADS, num_layers=DEPTH, pos_grid=model.pos_grid,
                out_indices=model.out_indices, final_norm=True, norm_eps=1e-6,
                reduction=red)  # fmt: skip


def images(B, size, seed):
    return torch.randn(B, 3, *size, generator=torch.Generator().manual_seed(seed))


def assert_no_near_ties(records):
    for recs in records:
        for r in recs:
            assert r.step.margin > 1e-8, f"near-tie in the reference at layer {r.layer}: reseed"


# ---------------------------------------------------------------------------------------------
# End to end, every score and aggregation
# ---------------------------------------------------------------------------------------------
CASES = [
    # (grid of the stored pos_embed, input size, reduction, fused, B)
    ((5, 7), (40, 56), dict(method="fatr", **LAYERS), True, 2),
    ((5, 7), (40, 56), dict(method="fatr", restore="residual", **LAYERS), False, 2),
    ((5, 7), (45, 70), dict(method="fatr", merge_radius=1, metric="x", **LAYERS), True, 3),
    ((5, 7), (40, 56), dict(method="fatr", prop_attn=False, reweight=None, **LAYERS), True, 1),
    ((5, 7), (40, 56), dict(method="fatr_paper", **LAYERS), True, 2),
    (
        (5, 7),
        (45, 70),
        dict(method="fatr_paper", restore="residual", reweight="paper", **LAYERS),
        True,
        3,
    ),  # fmt: skip  # pad + interpolate
    (
        (5, 7),
        (40, 56),
        dict(method="fatr_paper", windows=(3, 3, 1), score="hf_proxy", **LAYERS),
        True,
        1,
    ),  # fmt: skip
    (
        (4, 4),
        (24, 80),
        dict(method="fatr_paper", windows=(4, 2, 2), keep_ratio=(0.5, 0.9, 0.5), layers=(2, 4, 5)),
        True,
        3,
    ),  # fmt: skip
    (
        (5, 7),
        (40, 56),
        dict(method="fatr", aggregate="dc", window_size=(2, 2, 4), restore="residual", **LAYERS),
        True,
        2,
    ),  # fmt: skip
    (
        (5, 7),
        (40, 56),
        dict(method="fatr", aggregate=("merge", "dc", "dc"), windows=(1, 2, 1), **LAYERS),
        True,
        2,
    ),  # fmt: skip
    ((5, 7), (40, 56), dict(method="fatr", score="hf_bipartite", **LAYERS), True, 2),
    (
        (5, 7),
        (45, 70),
        dict(
            method="fatr",
            score="hf_bipartite",
            protect=0.2,
            metric="x",
            restore="residual",
            **LAYERS,
        ),
        True,
        2,
    ),  # fmt: skip
    ((5, 7), (40, 56), dict(method="fatr", score="hf_bipartite", protect=0.0, **LAYERS), True, 1),
    # below keep 0.7 the protected set shrinks so that the matching keeps a choice
    ((5, 7), (40, 56), dict(method="fatr", layers=(1, 3), keep_ratio=(0.5, 0.55)), True, 2),
    # nothing left to protect in either layer (24 -> 12 -> 6): no HF score is computed
    ((4, 6), (32, 48), dict(method="fatr", layers=(1, 3), keep_ratio=0.5), True, 2),
    ((5, 7), (40, 56), dict(method="evit", **LAYERS), True, 2),
    ((5, 7), (40, 56), dict(method="evit", restore="residual", **LAYERS), True, 2),
    ((5, 7), (40, 56), dict(method="tome", **LAYERS), True, 2),
    ((5, 7), (45, 70), dict(method="tome", restore="residual", metric="x", **LAYERS), True, 2),
    ((5, 7), (40, 56), dict(method="tome_constant", layers=(1, 2, 3, 4, 5, 6), r=4), True, 2),
    # ALGM drops whole 2x2 windows (3 tokens each): budgets that cut between windows
    ((5, 7), (40, 56), dict(method="algm", layers=(1, 4), keep_ratio=(0.65, 0.7)), True, 2),
    (
        (6, 8),
        (48, 64),
        dict(method="algm", layers=(2, 4), keep_ratio=(0.625, 0.7), restore="residual"),
        True,
        2,
    ),  # fmt: skip
    ((23, 37), (92 * 2, 148 * 2), dict(method="fatr", **LAYERS), True, 1),  # 23x37 grid
    # FATR's early local stage: whole 2x2 (3x3) windows by HF priority, then the global stage
    (
        (5, 7),
        (40, 56),
        dict(layers=(1, 4), keep_ratio=(0.5, 0.7), score=("window_hf", "hf_bipartite")),
        True,
        2,
    ),  # fmt: skip
    (
        (5, 7),
        (45, 70),
        dict(
            layers=(2, 5),
            keep_ratio=(0.6, 0.8),
            score=("window_hf", "hf_bipartite"),
            restore="residual",
        ),
        False,
        2,
    ),  # fmt: skip  # pad + interpolate; an odd grid leaves a row and a column out of windows
    (
        (6, 8),
        (48, 64),
        dict(layers=(1,), keep_ratio=0.4, score="window_hf", local_window=3),
        True,
        2,
    ),  # fmt: skip
]


@pytest.mark.parametrize("grid,size,red,fused,B", CASES)
def test_forward_matches_reference(grid, size, red, fused, B):
    model = build(red, grid, out_indices=(0, 1, 3, 4, 5), fused=fused, seed=len(CASES))
    x = images(B, size, seed=B)

    with torch.no_grad():
        outs = model(x)
        traces = model.reduction_trace(x)
    want, records = ref.vit_forward(model.state_dict(), x, ref_cfg(model))
    assert_no_near_ties(records)

    H, W = -(-size[0] // PATCH), -(-size[1] // PATCH)
    assert len(outs) == len(want) == 5
    for got, exp in zip(outs, want, strict=True):
        assert got.shape == (B, EMBED, H, W)
        assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)
    layers = [r.layer for r in records[0]]
    assert [t.layer for t in traces] == layers
    for j, t in enumerate(traces):
        assert t.hw_shape == (H, W)
        for b in range(B):
            r = records[b][j]
            assert t.kept[b].tolist() == r.step.kept
            assert t.source[b].tolist() == r.source
            want_scores = torch.tensor(r.step.kept_scores, dtype=ref.DT)
            # fp32 scores; the logit proxy's are sums over query rows, so tolerance scales
            finite = want_scores[want_scores.isfinite()]
            scale = finite.abs().max().item() if finite.numel() else 0.0
            assert_close(t.kept_scores[b].double(), want_scores, atol=1e-8 + 1e-6 * scale,
                         rtol=1e-5)  # fmt: skip
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
    want, _ = ref.vit_forward(model.state_dict(), x, ref_cfg(model))
    assert_close(got, feats, atol=1e-5, rtol=1e-5)
    assert_close(want[0], feats.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["fatr", "fatr_paper"])
def test_fused_and_explicit_models_agree(monkeypatch, method):
    red = dict(method=method, restore="residual", **LAYERS)
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
@pytest.mark.parametrize("method", ["fatr", "fatr_paper"])
def test_keep_all_with_identity_reweight_is_the_plain_vit(size, method):
    plain = build(None, seed=5, out_indices=(1, 3, 5))
    red = FATRVisionTransformer(
        img_size=(40, 56), patch_size=PATCH, embed_dims=EMBED, num_layers=DEPTH, num_heads=HEADS,
        out_indices=(1, 3, 5), reduction=dict(method=method, layers=(2, 4, 5), keep_ratio=1.0),
    ).eval()  # fmt: skip
    missing, unexpected = red.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == []
    own = [f"blocks.{i}.attn.omega1" for i in (2, 3, 4, 5)]
    if method == "fatr_paper":  # DC tokens: omega2 and the DC positional terms
        own += [f"blocks.{i}.attn.omega2" for i in (2, 3, 4, 5)]
        own += [f"blocks.{i}.reducer.dc_pos" for i in (1, 3, 4)]
    assert sorted(missing) == sorted(own)
    x = images(2, size, seed=6)
    with torch.no_grad():
        for a, b in zip(plain(x), red(x), strict=True):
            assert_close(b, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["fatr", "fatr_paper"])
def test_identity_reweight_at_init_is_plain_attention(method):
    """With tokens aggregated, 'identity' at init equals reweight=None (same weights)."""
    rew = build(dict(method=method, reweight="identity", **LAYERS), randomize=False, seed=7)
    none = build(dict(method=method, reweight=None, **LAYERS), randomize=False, seed=7)
    none.load_state_dict(rew.state_dict(), strict=False)
    assert all((blk.attn.omega2 == 0).all() for blk in rew.blocks if hasattr(blk.attn, "omega2"))
    x = images(2, (40, 56), seed=8)
    with torch.no_grad():
        assert_close(rew(x)[0], none(x)[0], atol=1e-6, rtol=1e-5)


def test_omega2_is_stored_as_the_dc_coefficient():
    """'paper' starts at omega2 = 1 (the paper's w2 = 0), 'identity' at 0 (plain attention)."""
    paper = build(dict(method="fatr_paper", reweight="paper", **LAYERS), randomize=False)
    ident = build(dict(method="fatr_paper", reweight="identity", **LAYERS), randomize=False)
    assert (paper.blocks[3].attn.omega2 == 1).all() and (ident.blocks[3].attn.omega2 == 0).all()
    assert not hasattr(build(dict(method="fatr", **LAYERS)).blocks[3].attn, "omega2")


# ---------------------------------------------------------------------------------------------
# omega1 = 0 (its init, or a reduction on an unreduced model's weights): the lerp is skipped
# ---------------------------------------------------------------------------------------------
def zero_omega1_(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("omega1"):
                p.zero_()
    return model.eval()  # reads omega1 again, as after loading weights


@pytest.mark.parametrize("method", ["fatr", "fatr_local", "fatr_paper"])
def test_skipped_identity_reweighting_is_exactly_the_reweighted_call(monkeypatch, method):
    from fatr_seg.layers import attention

    red = dict(method=method, layers=(1, 3, 4))
    model = zero_omega1_(build(red, grid=(6, 8), seed=11).double())
    calls = []
    spy = attention.reweighted_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return spy(*args, **kwargs)

    monkeypatch.setattr(attention, "reweighted_attention", counted)
    x = images(2, (6 * PATCH, 8 * PATCH), seed=12).double()
    with torch.no_grad():
        skipped = model(x)[0]
        # fatr_paper's DC term keeps the reweighted call; the others skip it in every block.
        assert (len(calls) > 0) == (method == "fatr_paper"), len(calls)
        monkeypatch.setattr(attention.ReweightedCore, "hp_is_identity", lambda self: False)
        full = model(x)[0]
    assert torch.equal(skipped, full)  # lerp(mean, AV, 1) is AV bit for bit


def test_omega1_is_read_again_after_every_change():
    model = zero_omega1_(build(dict(method="fatr", **LAYERS), seed=13))
    attn = model.blocks[3].attn
    zeros = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(2, (40, 56), seed=14)
    with torch.no_grad():
        skipped = model(x)[0]
        assert attn.hp_is_identity()
        attn.omega1.fill_(0.5)  # a new version: no longer trusted, used
        assert not attn.hp_is_identity()
        assert (model(x)[0] - skipped).abs().max() > 1e-3
        model.load_state_dict(zeros)  # loading reads it again
        assert attn.hp_is_identity()
        assert torch.equal(model(x)[0], skipped)
        model.train().double()  # new storage, in training: not read, not trusted
        assert not attn.hp_is_identity() and model.eval() and attn.hp_is_identity()
        model.float()  # moved in eval mode: read again
        assert attn.hp_is_identity()
        model.train()  # training mode never skips, with or without gradients
        assert not attn.hp_is_identity()
        model.eval()
    assert not attn.hp_is_identity()  # gradients enabled: omega1 needs its path
    model.train()(x)[0].square().mean().backward()
    assert attn.omega1.grad is not None and (attn.omega1.grad != 0).all()


def test_a_model_built_in_inference_mode_reweights_and_does_not_fail():
    """Inference tensors keep no version counter: omega1 is then never trusted, always used."""
    with torch.inference_mode():
        model = zero_omega1_(build(dict(method="fatr", **LAYERS), seed=15))
        x = images(2, (40, 56), seed=16)
        assert not model.blocks[3].attn.hp_is_identity()
        out = model(x)[0]
    ref = zero_omega1_(build(dict(method="fatr", **LAYERS), seed=15))
    with torch.no_grad():
        assert_close(out, ref(x)[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("restore", ["copy", "residual"])
def test_gradients_reach_omegas_dc_pos_and_every_token(restore):
    red = dict(method="fatr_paper", restore=restore, **LAYERS)
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


@pytest.mark.parametrize(
    "red,names",
    [
        (dict(method="fatr_paper", restore="residual", **LAYERS),
         ["blocks.2.attn.omega1", "blocks.4.attn.omega2", "blocks.5.attn.omega2",
          "blocks.1.reducer.dc_pos", "blocks.3.reducer.dc_pos", "blocks.4.reducer.dc_pos",
          "blocks.3.attn.qkv.weight", "pos_embed"]),
        (dict(method="fatr", restore="residual", **LAYERS),
         ["blocks.2.attn.omega1", "blocks.5.attn.omega1", "blocks.3.attn.qkv.weight",
          "blocks.4.mlp.fc1.weight", "pos_embed", "cls_token"]),
        (dict(method="fatr", **LAYERS), ["blocks.3.attn.omega1", "blocks.1.attn.qkv.weight"]),
        # the early local stage, proportional attention after it
        (dict(method="fatr_local", layers=(2, 4, 5), keep_ratio=(0.5, 0.6, 0.8)),
         ["blocks.2.attn.omega1", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc1.weight",
          "pos_embed"]),
    ],
)  # fmt: skip
def test_parameter_gradients_match_reference(red, names):
    model = build(red, seed=11, out_indices=(3, 5))
    x = images(2, (40, 56), seed=12)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(2, EMBED, 5, 7, generator=gen) for _ in range(2)]
    sum(((o * w).sum() for o, w in zip(model(x), weights, strict=True))).backward()

    sd = {k: v.detach().double().requires_grad_(k in names) for k, v in model.state_dict().items()}
    want, records = ref.vit_forward(sd, x, ref_cfg(model))
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
@pytest.mark.parametrize(
    "grid,red",
    [((5, 7), dict(method="fatr", restore="residual", **LAYERS)),
     ((5, 7), dict(method="fatr_paper", restore="residual", **LAYERS)),
     ((3, 5), dict(method="fatr_paper", windows=(3, 3, 1), **LAYERS)),
     ((5, 7), dict(method="tome", **LAYERS))],
)  # fmt: skip
def test_image_outputs_do_not_depend_on_the_rest_of_the_batch(grid, red):
    model = build(red, grid=grid, seed=13, out_indices=(1, 5))
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
@pytest.mark.parametrize("method", ["fatr", "fatr_local", "fatr_paper", "tome", "evit"])
def test_reduction_trace_is_consistent(method):
    red = dict(method=method, layers=(2, 4, 5), keep_ratio=0.7)
    model = build(red, grid=(9, 11), seed=16)
    cfg = ReductionConfig.from_dict(red)
    B, (H, W) = 3, (9, 11)
    N = H * W
    x = images(B, (H * PATCH, W * PATCH), seed=17)
    traces = model.reduction_trace(x)
    assert len(traces) == 3
    M_prev, kept_prev = N, None
    for j, t in enumerate(traces):
        K = cfg.num_keep(j, M_prev, (H, W))
        assert t.kept.shape == t.kept_scores.shape == (B, K)
        assert t.group.shape == t.source.shape == (B, N)
        cells = t.kept[t.kept >= 0].view(B, -1)
        assert (cells.sort(1).values.diff(dim=1) > 0).all()  # no repeats
        own = t.group == -1
        assert (own.sum(1) == cells.shape[1]).all()  # exactly the kept tokens' own cells
        assert own.gather(1, cells).all()
        # Every patch points at its token; a kept cell at its own position.
        pos = torch.full((B, N), -1, dtype=torch.long)
        pos.scatter_(1, cells, (t.kept >= 0).nonzero()[:, 1].view(B, -1))
        assert torch.equal(t.source[own], pos[own])
        assert torch.equal(t.group[~own], t.source[~own])
        if kept_prev is not None and method != "evit":  # a dropped patch never comes back
            assert torch.isin(cells, kept_prev).all()
        if method in ("tome", "fatr", "fatr_local"):  # B, protected, window-last tokens: +inf
            assert (t.kept_scores.isfinite() | (t.kept_scores == float("inf"))).all()
        else:
            assert t.kept_scores.isfinite().all()
        M_prev, kept_prev = K + (1 if method == "evit" else 0), cells  # + EViT's fused token
    _, state = model.forward_tokens(x, out_indices=(DEPTH - 1,))[0]
    assert torch.equal(state.source, traces[-1].source)
    fused = state.patch_idx.new_full((B, 1), -1)
    want = torch.cat([traces[-1].kept, fused], 1) if method == "evit" else traces[-1].kept
    assert torch.equal(state.patch_idx, want)


def test_plain_model_has_no_trace():
    model = build(None, seed=0)
    assert model.reduction_trace(images(1, (40, 56), seed=0)) == []


@pytest.mark.parametrize("method", ["fatr", "fatr_local", "fatr_paper"])
def test_reduce_in_training_false_trains_the_plain_vit_and_reduces_in_eval(method):
    """reduce_in_training=False: train mode is the unreduced ViT (same weights, reweighting at
    its identity init, so exactly the plain model), eval mode the reduced model."""
    red = dict(method=method, layers=(2, 4, 5), keep_ratio=(0.5, 0.7, 0.8))
    model = build(dict(red, reduce_in_training=False), grid=(6, 8), seed=21, randomize=False)
    reduced = build(red, grid=(6, 8), seed=21, randomize=False)
    plain = build(None, grid=(6, 8), seed=21, randomize=False)
    reduced.load_state_dict(model.state_dict())
    plain.load_state_dict(model.state_dict(), strict=False)
    x = images(2, (48, 64), seed=22)
    with torch.no_grad():
        want_eval, want_train = reduced(x)[0], plain(x)[0]
        assert not torch.allclose(want_eval, want_train, atol=1e-3)  # the reduction changes it
        assert torch.equal(model(x)[0], want_eval)
        asks = []  # whether each block asks its attention for the scoring statistics
        for blk in model.blocks:
            blk.attn.register_forward_pre_hook(lambda m, args: asks.append(args[3]))
        model.train()
        assert_close(model(x)[0], want_train, atol=1e-6, rtol=1e-5)
        assert asks == [False] * len(model.blocks)  # an idle reduction computes no statistics
        reduced.train()  # reduce_in_training=True (every preset's default) reduces in training
        assert torch.equal(reduced(x)[0], want_eval)


# ---------------------------------------------------------------------------------------------
# Runtime budget
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fatr", "fatr_paper", "tome", "tome_constant", "algm"])
def test_set_keep_ratio_equals_building_with_it(method):
    base = dict(method=method, layers=(2, 4, 5), keep_ratio=0.7)
    if method == "tome_constant":
        base = dict(method=method, layers=(1, 2, 3, 4, 5, 6), r=3)
    if method == "algm":
        base = dict(method=method, layers=(1, 4), keep_ratio=0.7)
    n = len(base["layers"])
    ratio = tuple(0.5 + 0.1 * i for i in range(n))
    model = build(base, seed=18)
    direct = build({**{k: v for k, v in base.items() if k != "r"}, "keep_ratio": ratio}, seed=18)
    direct.load_state_dict(model.state_dict())
    x = images(2, (40, 56), seed=19)
    with torch.no_grad():
        before = model(x)[0]
        model.set_keep_ratio(ratio)
        assert torch.equal(model(x)[0], direct(x)[0])
        model.set_keep_ratio(0.9 if method in ("tome", "tome_constant", "algm") else 1.0)
        after = model(x)[0]
    assert after.shape == before.shape
    assert not torch.equal(after, before)


def test_set_keep_ratio_rejects_bad_values():
    model = build(dict(method="fatr", **LAYERS))
    for bad, words in [(1.5, "(0, 1]"), (0.0, "(0, 1]"), ((0.5, 0.5), "3 values"),
                       ("0.5", "number"), (None, "number")]:  # fmt: skip
        with pytest.raises(ValueError, match="keep_ratio") as err:
            model.set_keep_ratio(bad)
        assert words in str(err.value)
    tome = build(dict(method="tome", **LAYERS))
    with pytest.raises(ValueError, match="keep_ratio"):
        tome.set_keep_ratio(0.4)  # bipartite matching merges at most half
    with pytest.raises(ValueError, match="no reduction"):
        build(None).set_keep_ratio(0.5)


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
