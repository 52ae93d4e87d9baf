"""Property tests (hypothesis) of the reduce / restore invariants, ops and whole model."""

import dataclasses

import pytest
import reference as ref
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from fatr_seg.layers import FATRVisionTransformer
from fatr_seg.ops import fold_tokens, init_state, num_keep, restore_tokens, select_topk

SETTINGS = settings(max_examples=30, deadline=None)
pytestmark = pytest.mark.usefixtures("single_thread")


@st.composite
def windows_pair(draw):
    w1 = draw(st.integers(1, 4))
    k = draw(st.sampled_from([d for d in range(1, w1 + 1) if w1 % d == 0]))
    return w1, w1 // k


# Grids, batches and two DC window sides of successive folds.
FOLDS = dict(H=st.integers(1, 12), W=st.integers(1, 12), B=st.integers(1, 3), ws=windows_pair())


def check_invariants(x, state, dc_pos):
    """The invariants of a state after any number of folds (x: (B, 1 + M + D, C))."""
    B, N = state.source.shape
    M, D = state.num_patches, state.num_dc
    assert x.shape[1] == 1 + M + D
    assert not x.isnan().any()
    # Every original patch is either an HF token or counted in exactly one DC token.
    assert (state.dc_count.sum(1) + M == N).all()
    assert (state.dc_count >= 0).all() and (state.dc_count == state.dc_count.round()).all()
    assert ((state.source >= 0) & (state.source < M + D)).all()
    assert (state.source.gather(1, state.patch_idx) == torch.arange(M)).all()
    # A DC token is the source of exactly the patches it counts.
    hits = torch.stack([torch.bincount(s, minlength=M + D) for s in state.source])
    assert (hits[:, M:] == state.dc_count).all() and (hits[:, :M] == 1).all()
    # Empty windows hold exactly their positional term, nothing else (and never NaN).
    empty = state.dc_count == 0
    if empty.any():
        assert torch.equal(x[:, 1 + M :][empty], dc_pos.expand(B, -1, -1)[empty])
    for residual in (None, state.residual):
        restored = restore_tokens(x[:, 1:], state.source, residual)
        assert not restored.isnan().any()
        kept = restored.gather(1, state.patch_idx[..., None].expand(-1, -1, x.shape[-1]))
        assert torch.equal(kept, x[:, 1 : 1 + M])  # kept tokens come back exactly


@SETTINGS
@given(
    **FOLDS,
    r1=st.floats(0.05, 1.0),
    r2=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_fold_restore_invariants_and_reference(H, W, B, ws, r1, r2, seed):
    C, N = 3, H * W
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1 + N, C, generator=gen)
    state = init_state(B, (H, W), x.device)
    per_image = [(x[b].double(), ref.ImageState.initial((H, W))) for b in range(B)]
    for w, r in zip(ws, (r1, r2), strict=True):
        M = state.num_patches
        keep = num_keep(r, M)
        assert keep == ref.num_keep(r, M) and 1 <= keep <= M
        scores = torch.randint(0, 4, (B, M), generator=gen).float()  # plenty of ties
        dc_pos = torch.randn(w * w, C, generator=gen)
        keep_pos, drop_pos = select_topk(scores, keep)
        x, state, _ = fold_tokens(x, state, keep_pos, drop_pos, scores, ("side", w), dc_pos,
                                  keep_residual=True)  # fmt: skip
        check_invariants(x, state, dc_pos)
        for b in range(B):
            xb, sb = per_image[b]
            xb, sb, _ = ref.reduce_step(xb, sb, scores[b].tolist(), keep, "dc", grid=("side", w),
                                        dc_pos=dc_pos.double(), skip_noop=False)  # fmt: skip
            per_image[b] = (xb, sb)
            assert state.source[b].tolist() == [sb.position(p) for p in range(N)]
            assert state.dc_count[b].tolist() == [float(c) for c in sb.dc_count]
            assert_close(x[b].double(), xb, atol=1e-5, rtol=1e-5)
            for mode in ("copy", "residual"):
                res = state.residual if mode == "residual" else None
                assert_close(restore_tokens(x[:, 1:], state.source, res)[b].double(),
                             ref.restore(xb[1:], sb, mode), atol=1e-5, rtol=1e-5)  # fmt: skip
        # The blocks in between change every token, in both implementations.
        x = torch.tanh(x) + 0.3 * x
        per_image = [(torch.tanh(xb) + 0.3 * xb, sb) for xb, sb in per_image]


@SETTINGS
@given(
    **FOLDS,
    ratios=st.tuples(st.floats(0.05, 1.0), st.floats(0.05, 1.0), st.floats(0.05, 1.0)),
    restore=st.sampled_from(["copy", "residual"]),
    reweight=st.sampled_from(["identity", "paper", None]),
    aggregate=st.sampled_from(["merge", "dc"]),
    seed=st.integers(0, 2**16),
)
def test_model_invariants_and_reference(H, W, B, ws, ratios, restore, reweight, aggregate, seed):
    patch, C, heads, depth = 2, 12, 2, 4
    windows = dict(windows=(ws[0], ws[0], ws[1])) if aggregate == "dc" else {}
    red = dict(method="fatr", layers=(1, 2, 4), keep_ratio=ratios, aggregate=aggregate,
               reweight=reweight, restore=restore, **windows)  # fmt: skip
    torch.manual_seed(seed)
    model = FATRVisionTransformer(
        img_size=(8, 8), patch_size=patch, embed_dims=C, num_layers=depth, num_heads=heads,
        out_indices=(1, 3), reduction=red, final_norm=False,
    )  # fmt: skip
    ref.randomize_(model, seed).eval()
    x = torch.randn(B, 3, H * patch, W * patch, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():
        outs = model(x)
        traces = model.reduction_trace(x)
        tokens, state = model.forward_tokens(x, out_indices=(depth - 1,))[0]
    N = H * W
    for o in outs:
        assert o.shape == (B, C, H, W) and o.isfinite().all()
    for t in traces:
        own = t.group == -1
        assert (own.sum(1) == t.kept.shape[1]).all()  # the kept tokens' own cells, no others
        assert torch.equal(t.group[~own], t.source[~own])
        # kept by a matching score: protected and B tokens score +inf
        assert (t.kept_scores.isfinite() | (t.kept_scores == float("inf"))).all()
    M = state.num_patches
    assert (state.dc_count.sum(1) + state.sizes().sum(1) == N).all()
    assert tokens.isfinite().all()
    final = outs[-1].flatten(2).transpose(1, 2)  # (B, N, C), no final norm
    kept = final.gather(1, state.patch_idx[..., None].expand(-1, -1, C))
    if restore == "copy" or aggregate == "dc":  # a merged token's own cell gets its residual
        assert torch.equal(kept, tokens[:, 1 : 1 + M])  # kept tokens restored exactly

    cfg = dict(
        patch_size=patch,
        num_heads=heads,
        num_layers=depth,
        pos_grid=model.pos_grid,
        out_indices=model.out_indices,
        final_norm=False,
        norm_eps=1e-6,
        reduction=dataclasses.asdict(model.reduction),
    )
    want, records = ref.vit_forward(model.state_dict(), x, cfg)
    assume(all(r.step.margin > 1e-7 for recs in records for r in recs))  # no near-ties
    for got, exp in zip(outs, want, strict=True):
        assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)
    for j, t in enumerate(traces):
        assert t.source.tolist() == [recs[j].source for recs in records]
