"""Selection, windows, DC aggregation, source map and restoration against the naive reference."""

import math

import pytest
import reference as ref
import torch
from torch.testing import assert_close

from fatr_seg.layers import ReductionConfig, TokenReducer
from fatr_seg.layers.attention import AttnStats
from fatr_seg.ops import (
    attention_with_lse,
    dc_window_ids,
    fold_tokens,
    init_state,
    num_keep,
    restore_tokens,
    select_topk,
    window_ids,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def between_layers(x):
    """A token-wise non-linear map standing in for the blocks between two reductions."""
    return torch.tanh(x) * 1.5 + 0.5 * x + 0.1


def random_inputs(B, H, W, C, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1 + H * W, C, generator=gen)
    return x, gen


# ---------------------------------------------------------------------------------------------
# num_keep, select_topk, window_ids, dc_window_ids
# ---------------------------------------------------------------------------------------------
def test_num_keep_is_robust_to_float_error():
    assert 0.07 * 100 > 7  # 7.000000000000001: a naive ceil would give 8
    assert num_keep(0.07, 100) == 7
    assert num_keep(0.07, 1200) == 84  # 84.00000000000001
    assert num_keep(0.7, 10) == 7
    assert num_keep(0.7, 100) == 70
    assert num_keep(0.3, 10) == 3
    assert num_keep(0.7, 7) == 5  # ceil(4.9)
    assert num_keep(1.0, 13) == 13
    assert num_keep(0.01, 5) == 1  # never empty
    for pct in range(1, 101):
        for M in (1, 2, 3, 10, 49, 100, 196, 851, 1024, 1200, 4096):
            assert num_keep(pct / 100, M) == max(1, math.ceil(pct * M / 100)), (pct, M)
            assert num_keep(pct / 100, M) == ref.num_keep(pct / 100, M)


def test_select_topk_breaks_ties_towards_lower_index():
    scores = torch.tensor(
        [
            [1.0, 3.0, 3.0, 2.0, 3.0],
            [5.0, 5.0, 5.0, 5.0, 5.0],
            [0.0, -0.0, 0.0, -0.0, 1.0],
            [2.0, 1.0, 1.0, 1.0, 2.0],
        ]
    )
    keep, drop = select_topk(scores, 2)
    assert keep.tolist() == [[1, 2], [0, 1], [0, 4], [0, 4]]
    assert drop.tolist() == [[0, 3, 4], [2, 3, 4], [1, 2, 3], [1, 2, 3]]
    keep, _ = select_topk(scores, 3)
    assert keep.tolist() == [[1, 2, 4], [0, 1, 2], [0, 1, 4], [0, 1, 4]]
    for row in scores.tolist():
        assert ref.select(row, 3)[0] == select_topk(torch.tensor([row]), 3)[0][0].tolist()


def test_select_topk_ties_are_deterministic_for_long_rows():
    # Sorting backends may reorder equal keys for long rows; the stable order must hold anyway.
    scores = torch.zeros(3, 5000)
    scores[:, ::7] = 1.0
    keep, _ = select_topk(scores, 1000)
    ones = torch.arange(0, 5000, 7)
    expected = torch.cat([ones, torch.tensor([i for i in range(5000) if i % 7][: 1000 - 715])])
    assert len(ones) == 715
    assert (keep == expected.sort().values).all()


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("M", [1, 2, 17, 300])
def test_select_topk_matches_reference(B, M):
    gen = torch.Generator().manual_seed(M)
    scores = torch.randint(0, 5, (B, M), generator=gen).float()  # many ties
    for k in sorted({1, max(1, M // 3), M}):
        keep, drop = select_topk(scores, k)
        assert keep.shape == (B, k) and drop.shape == (B, M - k)
        for b in range(B):
            want_keep, want_drop = ref.select(scores[b].tolist(), k)
            assert keep[b].tolist() == want_keep and drop[b].tolist() == want_drop


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 5), (23, 37), (37, 23), (4, 8)])
@pytest.mark.parametrize("w", [1, 2, 3, 4])
def test_window_ids_match_reference(hw, w):
    ids = window_ids(hw, w)
    assert ids.dtype == torch.long and ids.shape == (hw[0] * hw[1],)
    assert ids.tolist() == [ref.window_of(p, hw, w) for p in range(hw[0] * hw[1])]


def test_window_ids_uneven_split_example():
    # 5 rows in 2 windows: floor(r*2/5) = 0,0,0,1,1; 3 cols in 2 windows: 0,0,1.
    assert window_ids((5, 3), 2).view(5, 3).tolist() == [
        [0, 0, 1], [0, 0, 1], [0, 0, 1], [2, 2, 3], [2, 2, 3]
    ]  # fmt: skip


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 5), (23, 37), (37, 23), (4, 8), (22, 30)])
@pytest.mark.parametrize("grid", [("side", 1), ("side", 3), ("size", 1), ("size", 4), ("size", 7)])
def test_dc_window_ids_match_reference(hw, grid):
    ids, count = dc_window_ids(hw, grid)
    N = hw[0] * hw[1]
    assert ids.tolist() == [ref.window_of(p, hw, grid) for p in range(N)]
    assert count == ref.num_windows(hw, grid)
    assert 0 <= ids.min() and ids.max() < count
    if grid[0] == "size":  # every window of s x s patches is a contiguous block of the grid
        rows, cols = torch.arange(N) // hw[1], torch.arange(N) % hw[1]
        for j in ids.unique():
            r, c = rows[ids == j], cols[ids == j]
            assert r.max() - r.min() < grid[1] and c.max() - c.min() < grid[1]


@pytest.mark.parametrize("old,new", [(2, 1), (4, 2), (4, 1), (6, 3), (6, 2), (3, 3), (3, 1)])
@pytest.mark.parametrize("hw", [(23, 37), (7, 5), (12, 12)])
@pytest.mark.parametrize("kind", ["side", "size"])
def test_nested_windows_merge_exactly(old, new, hw, kind):
    """Old DC windows lie inside one new window each (sizes grow where sides shrink)."""
    if kind == "size":
        old, new = new, old  # windows by size nest when each size is a multiple of the last
    old_ids, _ = dc_window_ids(hw, (kind, old))
    new_ids, _ = dc_window_ids(hw, (kind, new))
    for j in old_ids.unique():
        assert new_ids[old_ids == j].unique().numel() == 1


# ---------------------------------------------------------------------------------------------
# Scores as the reducer computes them
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_dc", [0, 4])
@pytest.mark.parametrize("with_lse", [False, True])
def test_reducer_scores_match_explicit_column_mean(num_dc, with_lse):
    B, h, d, M = 3, 3, 16, 23 * 37
    n = 1 + M + num_dc
    gen = torch.Generator().manual_seed(num_dc)
    q, k, v = (torch.randn(B, h, n, d, generator=gen) * 1.5 for _ in range(3))
    dc_count = torch.full((B, num_dc), 3.0)
    if num_dc:
        dc_count[0, 1] = 0.0  # an empty window: masked key
    state = init_state(B, (23, 37), q.device).replace(
        patch_idx=torch.arange(M).expand(B, M), dc_count=dc_count,
        dc_grid=("side", 2) if num_dc else None,
    )  # fmt: skip
    bias = state.key_bias()
    assert (bias is None) == (num_dc == 0)
    lse = attention_with_lse(q, k, v, d**-0.5, bias)[1] if with_lse else None
    reducer = TokenReducer(ReductionConfig.from_dict(dict(method="fatr_paper")), 0, h * d)

    scores = reducer.scores(None, AttnStats(q, k, d**-0.5, lse), state, bias)[0]

    A = ref.attention_matrix(q, k, d**-0.5, bias)
    valid = None if bias is None else torch.isfinite(bias)  # empty DC tokens don't vote
    expected = ref.column_mean_scores(A, valid)[:, 1 : 1 + M]
    assert scores.shape == (B, M)
    assert_close(scores.double(), expected, atol=1e-7, rtol=1e-5)
    # Ranking by the column mean is the ranking by the paper's Ã_k = mean A_HP[:, k].
    a_hp = A - 1.0 / ref.valid_keys(bias, B, n).sum(1)[:, None, None, None]
    rows = torch.ones(B, n) if valid is None else valid.to(A.dtype)
    tilde = (a_hp * rows[:, None, :, None]).sum(dim=(1, 2))[:, 1 : 1 + M]
    keep = num_keep(0.7, M)
    for b in range(B):
        assert (
            ref.select(tilde[b].tolist(), keep)[0]
            == select_topk(scores[b : b + 1], keep)[0][0].tolist()
        )


# ---------------------------------------------------------------------------------------------
# fold_tokens + restore_tokens over two consecutive reduction layers
# ---------------------------------------------------------------------------------------------
def as_grid(w):
    return w if isinstance(w, tuple) else ("side", w)


def fold(x, state, scores, keep, w, dc_pos=None, keep_residual=False):
    """One DC step as a reduction layer takes it: top-k by ``scores``, fold into ``w × w`` (or
    the grid ``w``)."""
    keep_pos, drop_pos = select_topk(scores, keep)
    return fold_tokens(x, state, keep_pos, drop_pos, scores, as_grid(w), dc_pos, keep_residual)


def run_fatr(x, hw, steps, residual):
    """fold_tokens for each (scores, keep, windows, dc_pos), with `between_layers` in between."""
    state = init_state(x.shape[0], hw, x.device)
    out = []
    for i, (scores, keep, w, dc_pos) in enumerate(steps):
        if i:
            x = between_layers(x)
        x, state, rec = fold(x, state, scores, keep, w, dc_pos, keep_residual=residual)
        out.append((x, state, rec))
    return out


def ref_fold(xb, st, scores, keep, w, dc_pos):
    return ref.reduce_step(xb, st, scores, keep, "dc", grid=as_grid(w), dc_pos=dc_pos,
                           skip_noop=False)  # fmt: skip


def run_reference(x, hw, steps):
    """The reference, one image at a time; returns per step and image (x, state, StepResult)."""
    out = [[] for _ in steps]
    for b in range(x.shape[0]):
        xb, st = x[b].double(), ref.ImageState.initial(hw)
        for i, (scores, keep, w, dc_pos) in enumerate(steps):
            if i:
                xb = between_layers(xb)
            pos = None if dc_pos is None else dc_pos.double()
            xb, st, res = ref_fold(xb, st, scores[b].tolist(), keep, w, pos)
            out[i].append((xb, st, res))
    return out


def make_steps(B, hw, C, windows, ratios, gen, dc_pos=True, tie_levels=None):
    steps, M = [], hw[0] * hw[1]
    for w, r in zip(windows, ratios, strict=True):
        if tie_levels:
            scores = torch.randint(0, tie_levels, (B, M), generator=gen).float()
        else:
            scores = torch.rand(B, M, generator=gen)
        keep = num_keep(r, M)
        num = w * w if not isinstance(w, tuple) else 1  # windows by size share one term
        pos = torch.randn(num, C, generator=gen) if dc_pos else None
        steps.append((scores, keep, w, pos))
        M = keep
    return steps


def check_against_reference(x, hw, steps, atol=1e-5):
    N = hw[0] * hw[1]
    got = run_fatr(x, hw, steps, residual=True)
    want = run_reference(x, hw, steps)
    for (xs, state, rec), per_image, step in zip(got, want, steps, strict=True):
        for b, (xr, st, res) in enumerate(per_image):
            assert state.patch_idx[b].tolist() == st.hf
            assert state.source[b].tolist() == st.source()
            assert state.dc_count[b].tolist() == [float(c) for c in st.dc_count]
            assert state.dc_grid == st.dc_grid == as_grid(step[2])
            assert rec.kept[b].tolist() == res.kept
            assert rec.folded[b].tolist() == res.folded
            assert rec.folded_window[b].tolist() == [
                ref.window_of(p, hw, as_grid(step[2])) for p in res.folded
            ]
            assert_close(rec.kept_scores[b].double(), torch.tensor(res.kept_scores, dtype=ref.DT))
            assert_close(xs[b].double(), xr, atol=atol, rtol=1e-5)  # CLS, HF and DC values
            for mode in ("copy", "residual"):
                residual = state.residual if mode == "residual" else None
                restored = restore_tokens(xs[:, 1:], state.source, residual)
                assert restored.shape == (x.shape[0], N, x.shape[-1])
                assert_close(restored[b].double(), ref.restore(xr[1:], st, mode), atol=atol,
                             rtol=1e-5)  # fmt: skip
        assert not xs.isnan().any() and not state.residual.isnan().any()
    return got, want


GRIDS = [(23, 37), (5, 7), (1, 9), (2, 2)]
WINDOW_PAIRS = [
    (1, 1),
    (2, 2),
    (2, 1),
    (3, 3),
    (3, 1),
    (4, 2),
    (("size", 2), ("size", 4)),
    (("size", 3), ("size", 3)),
    (("size", 1), ("size", 5)),
]


@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("windows", WINDOW_PAIRS)
@pytest.mark.parametrize("B", [1, 3])
def test_two_reduction_layers_match_reference(hw, windows, B):
    C = 8
    w0, w1 = (as_grid(w)[1] for w in windows)
    x, gen = random_inputs(B, *hw, C, seed=hw[0] * 100 + w0 * 10 + w1 + B)
    steps = make_steps(B, hw, C, windows, (0.7, 0.6), gen)
    check_against_reference(x, hw, steps)


@pytest.mark.parametrize("windows", [(2, 1), (3, 3)])
def test_tied_scores_match_reference(windows):
    B, hw, C = 3, (9, 11), 4
    x, gen = random_inputs(B, *hw, C, seed=5)
    steps = make_steps(B, hw, C, windows, (0.5, 0.7), gen, tie_levels=3)
    check_against_reference(x, hw, steps)


def test_equal_scores_keep_the_lowest_positions():
    B, hw, C = 2, (4, 5), 3
    x, _ = random_inputs(B, *hw, C, seed=0)
    state = init_state(B, hw, x.device)
    out, state, rec = fold(x, state, torch.zeros(B, 20), 14, 2)
    assert rec.kept.tolist() == [list(range(14))] * B
    assert_close(out[:, 1:15], x[:, 1:15], atol=0, rtol=0)
    # A second step with equal scores again keeps the first positions of what is left.
    out, state, rec = fold(out, state, torch.ones(B, 14), 10, 1)
    assert rec.kept.tolist() == [list(range(10))] * B


def test_dc_values_by_hand():
    """2x2 grid: DC = mean of the dropped tokens, then a count-weighted merge into one window."""
    x = torch.tensor([[[0.0], [1.0], [2.0], [4.0], [8.0]]])  # CLS, 4 patches (C = 1)
    state = init_state(1, (2, 2), x.device)
    x, state, _ = fold(x, state, torch.tensor([[0.0, 3.0, 1.0, 2.0]]), 2, 2)
    # Keeps patches 1 and 3; patch 0 -> window 0, patch 2 -> window 2; windows 1, 3 empty.
    assert x.flatten().tolist() == [0.0, 2.0, 8.0, 1.0, 0.0, 4.0, 0.0]
    assert state.dc_count.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert state.source.tolist() == [[2, 0, 4, 1]]
    assert state.key_bias()[0, 3:].tolist() == [0.0, float("-inf"), 0.0, float("-inf")]
    x = x * 2  # the blocks in between change every token
    x, state, _ = fold(x, state, torch.tensor([[1.0, 0.0]]), 1, 1)
    # Keeps patch 1 (value 4); window 0 <- (1·2 + 1·8 + 0·0 + 1·16) / 3 (DC 0, DC 2, patch 3).
    assert_close(x.flatten(), torch.tensor([0.0, 4.0, 26.0 / 3]))
    assert state.dc_count.tolist() == [[3.0]]
    assert state.source.tolist() == [[1, 0, 1, 1]]
    assert state.key_bias()[0].tolist() == [0.0, 0.0, 0.0]  # DC tokens: a bias, never a read


# ---------------------------------------------------------------------------------------------
# Gradients through fold_tokens
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("windows", [(2, 1), (3, 3)])
def test_fold_gradients_match_reference_and_reach_every_token(windows):
    B, hw, C = 2, (7, 9), 5
    x, gen = random_inputs(B, *hw, C, seed=9)
    steps = make_steps(B, hw, C, windows, (0.7, 0.6), gen)
    weight = torch.randn(B, 1 + num_keep(0.6, num_keep(0.7, 63)) + windows[1] ** 2, C,
                         generator=gen)  # fmt: skip

    xg = x.clone().requires_grad_(True)
    pos = [s[3].clone().requires_grad_(True) for s in steps]
    steps_g = [(s, k, w, p) for (s, k, w, _), p in zip(steps, pos, strict=True)]
    (run_fatr(xg, hw, steps_g, residual=False)[-1][0] * weight).sum().backward()

    xr = x.double().requires_grad_(True)
    pos_r = [s[3].double().requires_grad_(True) for s in steps]
    total = 0
    for b in range(B):
        xb, st = xr[b], ref.ImageState.initial(hw)
        for i, (scores, keep, w, _) in enumerate(steps):
            if i:
                xb = between_layers(xb)
            xb, st, _ = ref_fold(xb, st, scores[b].tolist(), keep, w, pos_r[i])
        total = total + (xb * weight[b].double()).sum()
    total.backward()

    assert_close(xg.grad.double(), xr.grad, atol=1e-6, rtol=1e-5)
    for p, pr in zip(pos, pos_r, strict=True):
        assert_close(p.grad.double(), pr.grad, atol=1e-6, rtol=1e-5)
    # Every patch token is either kept or folded into a DC token: each one gets a gradient.
    assert (xg.grad[:, 1:].abs().sum(-1) > 0).all()


def test_residual_is_zero_for_hf_patches_and_exact_for_kept_tokens():
    B, hw, C = 3, (6, 10), 4
    x, gen = random_inputs(B, *hw, C, seed=2)
    steps = make_steps(B, hw, C, (2, 1), (0.5, 0.5), gen)
    xs, state, _ = run_fatr(x, hw, steps, residual=True)[-1]
    hf = torch.zeros(B, 60, dtype=torch.bool)
    hf.scatter_(1, state.patch_idx, True)
    assert (state.residual[hf] == 0).all()
    assert (state.residual[~hf].abs().sum(-1) > 0).all()
    for residual in (None, state.residual):
        restored = restore_tokens(xs[:, 1:], state.source, residual)
        kept = restored.gather(1, state.patch_idx[..., None].expand(-1, -1, C))
        assert torch.equal(kept, xs[:, 1 : 1 + state.num_patches])


def test_residual_restores_folded_tokens_exactly_without_later_change():
    """With nothing happening after the fold, 'residual' gives every patch its own feature back."""
    B, hw, C = 2, (5, 6), 3
    x, gen = random_inputs(B, *hw, C, seed=4)
    state = init_state(B, hw, x.device)
    xs, state, _ = fold(x, state, torch.rand(B, 30, generator=gen), 12, 2,
                        torch.randn(4, C, generator=gen), keep_residual=True)  # fmt: skip
    restored = restore_tokens(xs[:, 1:], state.source, state.residual)
    assert_close(restored, x[:, 1:], atol=1e-6, rtol=1e-6)
