"""TokenReducer (one score + one aggregation) and its ops against the loop-based reference."""

import math

import pytest
import reference as ref
import torch
from torch.testing import assert_close

from fatr_seg.layers import PRESETS, Block, FATRVisionTransformer, ReductionConfig, TokenReducer
from fatr_seg.layers.attention import AttnStats
from fatr_seg.ops import (
    bipartite_scores,
    cls_attention,
    fuse_tokens,
    init_state,
    merge_tokens,
    nearest_kept,
    protected_bipartite_scores,
    restore_tokens,
    select_topk,
    window_fold_scores,
    window_members,
    window_scores,
)

pytestmark = pytest.mark.usefixtures("single_thread")
C, HEADS, HEAD_DIM = 12, 3, 4
SCALE = HEAD_DIM**-0.5


def make_inputs(B, hw, seed, dtype=torch.float64):
    """Random sequence ``[CLS, N patches]``, attention statistics and the initial state."""
    g = torch.Generator().manual_seed(seed)
    N = hw[0] * hw[1]
    x = torch.randn(B, 1 + N, C, generator=g, dtype=dtype)
    q = torch.randn(B, HEADS, 1 + N, HEAD_DIM, generator=g, dtype=dtype)
    k = torch.randn(B, HEADS, 1 + N, HEAD_DIM, generator=g, dtype=dtype)
    return x, AttnStats(q, k, SCALE, None), init_state(B, hw, x.device)


def reducer(method, j=0, **overrides):
    cfg = ReductionConfig.from_dict(dict(method=method, **overrides))
    torch.manual_seed(0)
    return TokenReducer(cfg, j, C).double()


def between_layers(x):
    """A token-wise non-linear map standing in for the blocks between two reductions."""
    return torch.tanh(x) * 1.5 + 0.5 * x + 0.1


# ---------------------------------------------------------------------------------------------
# Scores and partners
# ---------------------------------------------------------------------------------------------
def test_cls_attention_is_the_explicit_softmax_row():
    _, stats, _ = make_inputs(2, (3, 4), seed=2)
    bias = torch.randn(2, 13, dtype=torch.float64)
    got = cls_attention(stats.q, stats.k, SCALE, bias)
    A = ref.attention_matrix(stats.q, stats.k, SCALE, bias)
    want = torch.tensor([ref.cls_scores(A[b]) for b in range(2)], dtype=ref.DT)
    assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    assert_close(got.sum(1), torch.ones(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("lse", [True, False])
def test_hf_score_of_merged_tokens_weighs_their_sizes(lse):
    """With proportional attention a token's HF score is its column mean of
    softmax(q·kᵀ·scale + log size), whether the sizes enter as the bias or scale the means."""
    _, stats, state = make_inputs(2, (3, 4), seed=5)
    size = torch.randint(1, 5, (2, 12), generator=torch.Generator().manual_seed(5)).double()
    state = state.replace(patch_size=size)
    bias = state.key_bias(torch.float64)
    A = ref.attention_matrix(stats.q, stats.k, SCALE, bias)  # (B, h, n, n)
    if lse:
        logits = stats.q @ stats.k.transpose(-2, -1) * SCALE + bias[:, None, None, :]
        stats = stats._replace(lse=logits.logsumexp(-1))
    got = reducer("fatr", layers=(1,)).hf_score(stats, state, bias)
    assert_close(got.double(), A.mean(dim=(1, 2))[:, 1:], atol=1e-9, rtol=1e-6)  # float32 scores


@pytest.mark.parametrize("M", [1, 2, 7, 30])
def test_bipartite_scores_follow_tomes_split(M):
    metric = torch.randn(3, M, 5, generator=torch.Generator().manual_seed(M), dtype=ref.DT)
    scores, partner = bipartite_scores(metric)
    for b in range(3):
        want_s, want_p = ref.bipartite(metric[b])
        assert partner[b].tolist() == want_p
        assert_close(scores[b].double(), torch.tensor(want_s, dtype=ref.DT), atol=1e-6, rtol=0)
    assert (scores[:, 0::2] == math.inf).all()  # B (even patch positions) always stays


@pytest.mark.parametrize("M,protect", [(1, 0), (7, 2), (30, 9), (30, 0), (12, 11)])
def test_protected_bipartite_scores(M, protect):
    gen = torch.Generator().manual_seed(M + protect)
    metric = torch.randn(3, M, 5, generator=gen, dtype=ref.DT)
    priority = torch.randint(0, 4, (3, M), generator=gen).double()  # ties on purpose
    scores, partner = protected_bipartite_scores(metric, priority, protect)
    for b in range(3):
        want_s, want_p = ref.protected_bipartite(metric[b], priority[b].tolist(), protect)
        assert partner[b].tolist() == want_p
        assert_close(scores[b].double(), torch.tensor(want_s, dtype=ref.DT), atol=1e-6, rtol=0)
    assert ((scores == math.inf).sum(1) == protect + (M - protect + 1) // 2).all()
    if protect == 0:  # nothing protected: exactly ToMe's split
        assert torch.equal(partner, bipartite_scores(metric)[1])


@pytest.mark.parametrize("hw", [(4, 4), (5, 7), (1, 6), (3, 3)])
def test_window_scores_follow_algms_windows(hw):
    N = hw[0] * hw[1]
    metric = torch.randn(2, N, 6, generator=torch.Generator().manual_seed(N), dtype=ref.DT)
    scores, partner = window_scores(metric, hw)
    for b in range(2):
        want_s, want_p, _ = ref.windows2x2(metric[b], hw)
        assert partner[b].tolist() == want_p
        assert_close(scores[b].double(), torch.tensor(want_s, dtype=ref.DT), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="full"):
        window_scores(metric[:, :-1], hw)


@pytest.mark.parametrize("radius", [None, 1, 2])
def test_nearest_kept_is_the_most_similar_kept_token(radius):
    B, hw = 2, (5, 6)
    N = 30
    gen = torch.Generator().manual_seed(3)
    metric = torch.randn(B, N, 4, generator=gen, dtype=ref.DT)
    keep_pos, drop_pos = select_topk(torch.rand(B, N, generator=gen), 18)
    patch_idx = torch.arange(N).expand(B, N)
    dst = nearest_kept(metric, keep_pos, drop_pos, patch_idx, hw, radius)
    for b in range(B):
        st = ref.ImageState.initial(hw)
        keep = keep_pos[b].tolist()
        for i, pos in enumerate(drop_pos[b].tolist()):
            vals = []
            for j in keep:
                v = ref.cosine(metric[b, pos], metric[b, j])
                if radius is not None:
                    (r0, c0), (r1, c1) = divmod(st.patches[pos].cell, 6), divmod(j, 6)
                    v -= 0.0 if max(abs(r0 - r1), abs(c0 - c1)) <= radius else 3.0
                vals.append(v)
            assert int(dst[b, i]) == max(range(len(keep)), key=lambda t: (vals[t], -t))


# ---------------------------------------------------------------------------------------------
# Merging and fusion over two steps, against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aggregate", ["merge", "fuse"])
@pytest.mark.parametrize("hw", [(5, 7), (6, 6)])
def test_two_steps_match_reference_with_residual_and_gradients(aggregate, hw):
    B, N = 2, hw[0] * hw[1]
    gen = torch.Generator().manual_seed(N)
    x0 = torch.randn(B, 1 + N, C, generator=gen, dtype=ref.DT)
    metrics = [torch.randn(B, N, 4, generator=gen, dtype=ref.DT) for _ in range(2)]
    scores = [torch.rand(B, N, generator=gen, dtype=ref.DT) for _ in range(2)]
    keeps = [math.ceil(0.6 * N), None]
    keeps[1] = math.ceil(0.7 * (keeps[0] + (aggregate == "fuse")))
    weight = torch.randn(B, N, C, generator=gen, dtype=ref.DT)

    x = x0.clone().requires_grad_(True)
    y, state = x, init_state(B, hw, x.device)
    for step in range(2):
        y = between_layers(y) if step else y
        M = state.num_patches
        s = scores[step][:, :M]
        keep_pos, drop_pos = select_topk(s, keeps[step])
        if aggregate == "merge":
            dst = nearest_kept(metrics[step][:, :M], keep_pos, drop_pos)
            y, state, _ = merge_tokens(y, state, keep_pos, drop_pos, dst, s, keep_residual=True)
        else:
            y, state, _ = fuse_tokens(y, state, keep_pos, drop_pos, s, s, keep_residual=True)
    outs = [restore_tokens(y[:, 1:], state.source, r) for r in (None, state.residual)]
    (outs[1] * weight).sum().backward()

    xr = x0.clone().requires_grad_(True)
    total = 0
    for b in range(B):
        yb, st = xr[b], ref.ImageState.initial(hw)
        for step in range(2):
            yb = between_layers(yb) if step else yb
            M = len(st.patches)
            s = scores[step][b, :M].tolist()
            yb, st, _ = ref.reduce_step(yb, st, s, keeps[step], aggregate, metric=metrics[step][b],
                                        weights=s)  # fmt: skip
        assert state.source[b].tolist() == st.source()
        assert state.patch_idx[b].tolist() == st.hf
        if aggregate == "merge":
            assert state.patch_size[b].tolist() == [t.size for t in st.patches]
        assert_close(y[b].detach(), yb.detach(), atol=1e-12, rtol=1e-12)
        for mode, out in zip(("copy", "residual"), outs, strict=True):
            assert_close(out[b].detach(), ref.restore(yb[1:], st, mode), atol=1e-12, rtol=1e-12)
        total = total + (ref.restore(yb[1:], st, "residual") * weight[b]).sum()
    total.backward()
    assert_close(x.grad, xr.grad, atol=1e-12, rtol=1e-12)
    assert (x.grad[:, 1:].abs().sum(-1) > 0).all()  # every token reaches the output


def test_merge_is_a_size_weighted_mean_by_hand():
    x = torch.tensor([[[0.0], [1.0], [2.0], [4.0], [8.0]]])  # CLS, 4 patches (C = 1)
    sizes = torch.tensor([[1.0, 3.0, 1.0, 1.0]])  # patch 1 already stands for 3 patches
    state = init_state(1, (2, 2), x.device).replace(patch_size=sizes)
    keep_pos, drop_pos = torch.tensor([[1, 3]]), torch.tensor([[0, 2]])
    dst = torch.tensor([[0, 1]])  # patch 0 -> token of patch 1, patch 2 -> token of patch 3
    out, st, rec = merge_tokens(x, state, keep_pos, drop_pos, dst, torch.zeros(1, 4))
    assert out.flatten().tolist() == [0.0, (1 + 3 * 2) / 4, (4 + 8) / 2]
    assert st.patch_size.tolist() == [[4.0, 2.0]]
    assert st.source.tolist() == [[0, 0, 1, 1]]
    assert_close(st.key_bias()[0], torch.tensor([0.0, math.log(4), math.log(2)]))
    no_prop = merge_tokens(x, state, keep_pos, drop_pos, dst, torch.zeros(1, 4), prop_attn=False)
    assert no_prop[1].key_bias() is None  # ALGM: sizes weigh the means but not the attention


def test_merge_key_bias_enters_the_next_attention():
    B, hw = 2, (4, 4)
    x, stats, state = make_inputs(B, hw, seed=6, dtype=torch.float32)
    x, st, _ = reducer("tome", keep_ratio=0.6).float()(x, stats, state)
    bias = st.key_bias()
    assert_close(bias[:, 1:], st.patch_size.log(), atol=0, rtol=0)
    assert (st.patch_size > 1).any()  # some tokens were merged: the test is not vacuous
    torch.manual_seed(7)
    blk = Block(C, HEADS, reweight=None, fused_attn=True).eval()
    with torch.no_grad():
        got, _, _ = blk(x, st)
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(B, -1, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = ((q @ k.transpose(-2, -1)) * SCALE + bias[:, None, None]).softmax(-1)
        y = x + blk.attn.proj((a @ v).transpose(1, 2).reshape(B, -1, C))
        want = y + blk.mlp(blk.norm2(y))
    assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Budget, every preset
# ---------------------------------------------------------------------------------------------
def per_layer(method):
    """The preset keys given per layer, for two layers: a preset with an early local stage
    gives its global stages' scores (its local stage has tests of its own)."""
    if method == "fatr_paper":
        return dict(windows=(2, 1))
    score = PRESETS[method].get("score")
    return dict(score=score[-2:]) if isinstance(score, tuple) and len(score) != 2 else {}


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(PRESETS))
@pytest.mark.parametrize("hw,keep_ratio", [((6, 6), 0.7), ((5, 7), 0.55), ((4, 5), 0.9)])
def test_keeps_exactly_its_budget_and_restores_kept_tokens(method, hw, keep_ratio):
    x, stats, state = make_inputs(3, hw, seed=1)
    N = hw[0] * hw[1]
    red = reducer(method, keep_ratio=keep_ratio, layers=(1, 2), **per_layer(method))
    out, new_state, rec = red(x, stats, state)
    budget = red.cfg.num_keep(0, N)
    floor = 0  # matching merges at most one token of each pair (protection gives way first)
    if red.score in ("bipartite", "hf_bipartite", "random_bipartite"):
        floor = N - N // 2
    assert budget == max(math.ceil(keep_ratio * N - 1e-9), floor)
    extra = {"dc": 4 if method == "fatr_paper" else 0, "fuse": 1, "merge": 0}[red.aggregate]
    assert rec.kept.shape == (3, budget)
    assert out.shape == (3, 1 + budget + extra, C)
    grid = restore_tokens(out[:, 1:], new_state.source)
    for b in range(3):
        for j, p in enumerate(new_state.patch_idx[b, :budget].tolist()):
            assert torch.equal(grid[b, p], out[b, 1 + j])  # the kept token, exactly
        for p in range(N):
            assert torch.equal(grid[b, p], out[b, 1 + int(new_state.source[b, p])])
    assert torch.equal(out[:, 0], x[:, 0])  # CLS is never touched


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_reducer_outputs_do_not_depend_on_the_rest_of_the_batch(method):
    if method == "random":
        pytest.skip("draws new scores per call")
    x, stats, state = make_inputs(4, (6, 6), seed=9)
    red = reducer(method, keep_ratio=0.7, layers=(1, 2), **per_layer(method))
    out, st, _ = red(x, stats, state)
    for b in range(4):
        sl = slice(b, b + 1)
        one = AttnStats(stats.q[sl], stats.k[sl], SCALE, None)
        o1, s1, _ = red(x[sl], one, init_state(1, (6, 6), x.device))
        assert_close(out[sl], o1, atol=1e-12, rtol=1e-12)
        assert torch.equal(st.source[sl], s1.source)
        assert torch.equal(st.patch_idx[sl], s1.patch_idx)


def test_random_keeps_its_budget_with_new_draws():
    x, stats, state = make_inputs(4, (5, 6), seed=10)
    red = reducer("random", keep_ratio=0.7)
    torch.manual_seed(0)
    _, s_a, _ = red(x, stats, state)
    _, s_b, _ = red(x, stats, state)
    assert s_a.patch_idx.shape == s_b.patch_idx.shape == (4, 21)
    assert not torch.equal(s_a.patch_idx, s_b.patch_idx)


def test_model_keeps_the_budget_at_every_reduction_layer():
    torch.manual_seed(0)
    model = FATRVisionTransformer(img_size=(40, 56), patch_size=8, embed_dims=C, num_layers=4,
                                  num_heads=HEADS, reduction=dict(method="fatr", layers=(1, 2, 4),
                                  keep_ratio=(0.7, 0.6, 0.8))).eval()  # fmt: skip
    traces = model.reduction_trace(torch.randn(2, 3, 40, 56))
    assert [t.kept.shape[1] for t in traces] == [25, 15, 12]


@pytest.mark.parametrize("protect", [0.0, 0.2, 0.45])
def test_protection_gives_way_to_the_budget(protect):
    """num_protected is the largest P <= ceil(protect·M) whose (M - P) // 2 A tokens supply the
    M - keep merges with at most 4 in 5 of them merging, or 0 (brute force over P), so a
    protecting score reaches every budget down to ceil(M / 2), and the default (protect 0.2)
    protects all of its 20 % at keep 0.7 and none at 0.6."""
    cfg = reducer("fatr", keep_ratio=0.7, layers=(1, 2), protect=protect).cfg
    for M in range(1, 60):
        for keep in range(M - M // 2, M + 1):
            top = math.ceil(protect * M - 1e-9)
            ok = [P for P in range(0, top + 1) if 4 * ((M - P) // 2) >= 5 * (M - keep)]
            want = max(ok, default=0)
            assert cfg.num_protected(M, keep) == want, (M, keep)
            assert (M - want) // 2 >= M - keep  # the budget is always met
    if protect == 0.2:
        for M in (256, 690, 717, 1024, 4096):  # crops, CamVid, ViT-S 512² (and its layer 2), 1024²
            assert cfg.num_protected(M, math.ceil(0.7 * M)) == math.ceil(0.2 * M)
            assert cfg.num_protected(M, math.ceil(0.6 * M)) <= 1  # ceil rounding


@pytest.mark.parametrize("method", ["fatr", "fatr_local", "random"])
def test_protecting_score_reaches_half_the_tokens(method):
    """Below (1 + protect) / 2 the default still keeps exactly its budget: 0.5 keeps half, not
    the 0.6 that full protection would allow, and merges all of the M - keep dropped tokens."""
    N = 36
    kept = {}
    for keep_ratio in (0.5, 0.55, 0.6):
        x, stats, state = make_inputs(2, (6, 6), seed=3)
        red = reducer(method, keep_ratio=keep_ratio, layers=(1, 2), **per_layer(method))
        out, new_state, rec = red(x, stats, state)
        kept[keep_ratio] = rec.kept.shape[1]
        assert out.shape[1] == 1 + kept[keep_ratio]
        assert (new_state.patch_size.sum(1) == N).all()  # every patch is in some token
    assert kept == {0.5: 18, 0.55: 20, 0.6: 22}


@pytest.mark.parametrize("hw,window", [((4, 4), 2), ((5, 7), 2), ((7, 6), 3), ((1, 6), 2)])
def test_window_fold_scores_fold_whole_windows_by_priority(hw, window):
    """The F lowest-priority windows fold whole into their last member, also with tied
    priorities; tokens outside every window never fold."""
    N = hw[0] * hw[1]
    win = window_members(hw, window)
    G, s = win.shape
    assert G == (hw[0] // window) * (hw[1] // window)
    gen = torch.Generator().manual_seed(N)
    hf = torch.rand(2, N, generator=gen, dtype=ref.DT)
    hf[1] = 0.5  # every window ties
    prio = hf[:, win].amax(-1) if G else hf[:, :0]
    scores, partner = window_fold_scores(prio, win, N)
    for F in range(G + 1):
        keep_pos, drop_pos = select_topk(scores, N - F * (s - 1))
        for b in range(2):
            want_s, want_p, _ = ref.window_hf_fold(hf[b].tolist(), hw, window, F)
            assert partner[b].tolist() == want_p
            assert scores[b].tolist() == want_s
            folded = set(drop_pos[b].tolist())
            # whole windows only: a window's members fold together or not at all
            for cells in win.tolist():
                assert set(cells[:-1]) <= folded or not set(cells[:-1]) & folded
                assert cells[-1] not in folded
            assert len(folded) == F * (s - 1)


def test_early_local_stage_counts_are_static_and_batch_independent():
    """Every image of a batch folds the same number of windows; an image's result does not
    depend on the others in its batch."""
    torch.manual_seed(0)
    red = dict(layers=(1, 3), keep_ratio=(0.5, 0.7), score=("window_hf", "hf_bipartite"))
    model = FATRVisionTransformer(img_size=48, patch_size=8, embed_dims=24, num_layers=4,
                                  num_heads=3, reduction=red).eval()  # fmt: skip
    x = torch.randn(3, 3, 48, 56)
    with torch.no_grad():
        traces = model.reduction_trace(x)
        alone = model.reduction_trace(x[1:2])
        out, out1 = model(x)[0], model(x[1:2])[0]
    M = 6 * 7
    # 0.5 of 42 tokens: 21 to remove, 7 whole windows of 3 (9 windows on the 6x7 grid)
    assert traces[0].kept.shape == (3, M - 7 * 3)
    assert torch.equal(traces[0].kept[1:2], alone[0].kept)
    assert_close(out[1:2], out1, atol=1e-5, rtol=1e-5)
