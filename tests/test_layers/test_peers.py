"""Peer reducers (EViT, ToMe, random) against explicit per-image reference code written here.

Every reference below loops over images and tokens in plain Python, so it shares no indexing
code with :mod:`fatr_seg.ops.peers` / :mod:`fatr_seg.ops.reduce`.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from fatr_seg.layers import (
    Block,
    EViTReducer,
    FATRVisionTransformer,
    FrequencyTokenReducer,
    ReductionConfig,
    ToMeReducer,
)
from fatr_seg.layers.attention import AttnStats
from fatr_seg.ops import fold_tokens, init_state, restore_tokens
from fatr_seg.ops.peers import cls_attention, tome_merge

pytestmark = pytest.mark.usefixtures("single_thread")
C, HEADS, HEAD_DIM = 12, 3, 4
SCALE = HEAD_DIM**-0.5


def make_inputs(B, hw, seed):
    """Random sequence ``[CLS, N patches]``, attention statistics and the initial state."""
    g = torch.Generator().manual_seed(seed)
    N = hw[0] * hw[1]
    x = torch.randn(B, 1 + N, C, generator=g, dtype=torch.float64)
    q = torch.randn(B, HEADS, 1 + N, HEAD_DIM, generator=g, dtype=torch.float64)
    k = torch.randn(B, HEADS, 1 + N, HEAD_DIM, generator=g, dtype=torch.float64)
    return x, AttnStats(q, k, SCALE, None), init_state(B, hw, x.device)


def reducers(keep_ratio=0.7):
    torch.manual_seed(0)
    return {
        "fatr": FrequencyTokenReducer(C, keep_ratio, 2, "exact", "fatr").double(),
        "random": FrequencyTokenReducer(C, keep_ratio, 2, "exact", "random").double(),
        "evit": EViTReducer(C, keep_ratio).double(),
        "tome": ToMeReducer(keep_ratio),
    }


def ref_cls_attention(q, k, scale, bias=None):
    """Head-averaged softmax of the CLS query's logits, one image at a time: (n,) per image."""
    out = []
    for b in range(q.shape[0]):
        rows = []
        for h in range(q.shape[1]):
            logits = [float(q[b, h, 0] @ k[b, h, j]) * scale for j in range(k.shape[2])]
            if bias is not None:
                logits = [v + float(bias[b, j]) for j, v in enumerate(logits)]
            z = max(logits)
            e = [math.exp(v - z) for v in logits]
            rows.append([v / sum(e) for v in e])
        out.append([sum(r[j] for r in rows) / len(rows) for j in range(k.shape[2])])
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Budget and restoration, every reducer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fatr", "random", "evit", "tome"])
@pytest.mark.parametrize("hw,keep_ratio", [((6, 6), 0.7), ((5, 7), 0.55), ((4, 5), 0.9)])
def test_keeps_exactly_its_budget_and_restores_kept_tokens(method, hw, keep_ratio):
    x, stats, state = make_inputs(3, hw, seed=1)
    N = hw[0] * hw[1]
    budget = math.ceil(keep_ratio * N - 1e-9)
    out, new_state, rec = reducers(keep_ratio)[method](x, stats, state)
    assert new_state.num_patches == budget
    assert rec.kept.shape == (3, budget)
    extra = {"fatr": 4, "random": 4, "evit": 1, "tome": 0}[method]  # DC / fused tokens
    assert out.shape == (3, 1 + budget + extra, C)
    grid = restore_tokens(out[:, 1:], new_state.source)
    for b in range(3):
        kept = new_state.patch_idx[b].tolist()
        assert len(set(kept)) == budget
        for j, p in enumerate(kept):
            assert torch.equal(grid[b, p], out[b, 1 + j])  # the kept token, exactly
            if method != "tome":  # a kept (unmerged) token is the input token unchanged
                assert torch.equal(out[b, 1 + j], x[b, 1 + p])
        # Every other position reads an extra token (DC / fused) or, for ToMe, the token it
        # was merged into.
        others = [p for p in range(N) if p not in kept]
        assert len(others) == N - budget
        for p in others:
            s = int(new_state.source[b, p])
            assert s >= budget if method != "tome" else 0 <= s < budget
            assert torch.equal(grid[b, p], out[b, 1 + s])
    assert torch.equal(out[:, 0], x[:, 0])  # CLS is never touched


@pytest.mark.parametrize("method", ["fatr", "random", "evit", "tome"])
def test_model_keeps_the_budget_at_every_reduction_layer(method):
    torch.manual_seed(0)
    red = dict(method=method, layers=(1, 2, 4), keep_ratio=(0.7, 0.6, 0.8),
               reweight=None if method == "tome" else "identity")  # fmt: skip
    model = FATRVisionTransformer(img_size=(40, 56), patch_size=8, embed_dims=C, num_layers=4,
                                  num_heads=HEADS, reduction=red).eval()  # fmt: skip
    traces = model.reduction_trace(torch.randn(2, 3, 40, 56))
    m, expected = 35, []
    for r in (0.7, 0.6, 0.8):
        m = math.ceil(r * m - 1e-9)
        expected.append(m)
    assert [t.kept.shape[1] for t in traces] == expected == [25, 15, 12]


# ---------------------------------------------------------------------------------------------
# EViT
# ---------------------------------------------------------------------------------------------
def test_cls_attention_is_the_explicit_softmax_row():
    _, stats, _ = make_inputs(2, (3, 4), seed=2)
    bias = torch.randn(2, 13, dtype=torch.float64)
    bias[1, 5] = -math.inf
    for kb in (None, bias):
        got = cls_attention(stats.q, stats.k, SCALE, kb)
        want = ref_cls_attention(stats.q, stats.k, SCALE, kb)
        assert_close(got.double(), want, atol=1e-6, rtol=1e-5)  # computed in float32
    assert_close(cls_attention(stats.q, stats.k, SCALE, bias).sum(-1), torch.ones(2).float())


def ref_evit(x, attn, keep, fused=None, fused_weight=0.0):
    """One EViT step for one image: top-k by attention, the rest fused by attention weight.

    Returns the kept positions (ascending), the fused token and its total weight.
    """
    M = len(attn)
    order = sorted(range(M), key=lambda i: (-float(attn[i]), i))
    kept, dropped = sorted(order[:keep]), order[keep:]
    total = fused_weight + sum(float(attn[i]) for i in dropped)
    acc = torch.zeros(x.shape[-1], dtype=torch.float64)
    if fused is not None:
        acc = acc + fused_weight * fused
    for i in dropped:
        acc = acc + float(attn[i]) * x[i]
    return kept, acc / total, total


def test_evit_fused_token_is_the_attention_weighted_mean_over_two_steps():
    B, hw = 2, (5, 6)
    x, stats, state = make_inputs(B, hw, seed=3)
    red = EViTReducer(C, keep_ratio=0.6).double()
    out1, st1, _ = red(x, stats, state)
    K1 = st1.num_patches
    # Second step: new statistics on the reduced sequence [CLS, K1 patches, fused].
    g = torch.Generator().manual_seed(4)
    q2 = torch.randn(B, HEADS, out1.shape[1], HEAD_DIM, generator=g, dtype=torch.float64)
    k2 = torch.randn(B, HEADS, out1.shape[1], HEAD_DIM, generator=g, dtype=torch.float64)
    out2, st2, _ = red(out1, AttnStats(q2, k2, SCALE, None), st1)
    K2 = st2.num_patches
    assert (K1, K2) == (18, 11)
    a1 = ref_cls_attention(stats.q, stats.k, SCALE)
    a2 = ref_cls_attention(q2, k2, SCALE)
    for b in range(B):
        kept1, fused1, w1 = ref_evit(x[b, 1:], a1[b, 1:], K1)
        assert st1.patch_idx[b].tolist() == kept1
        assert_close(out1[b, -1], fused1, atol=1e-6, rtol=1e-5)
        assert_close(st1.dc_weight[b], torch.tensor([w1]).float(), atol=1e-6, rtol=1e-5)
        # Step 2 scores patch tokens only; the old fused token joins by its total weight.
        kept2, fused2, _ = ref_evit(out1[b, 1 : 1 + K1], a2[b, 1 : 1 + K1], K2, out1[b, -1], w1)
        assert st2.patch_idx[b].tolist() == [kept1[j] for j in kept2]
        assert_close(out2[b, -1], fused2, atol=1e-6, rtol=1e-5)
        # Restoration: every fused patch reads the fused token.
        grid = restore_tokens(out2[:, 1:], st2.source)
        for p in set(range(30)) - set(st2.patch_idx[b].tolist()):
            assert torch.equal(grid[b, p], out2[b, -1])
    assert st2.dc_count.tolist() == [[19.0], [19.0]]  # 30 - 11 patches fused


# ---------------------------------------------------------------------------------------------
# ToMe
# ---------------------------------------------------------------------------------------------
def ref_tome(tokens, metric, sizes, members, r):
    """One bipartite soft matching step for one image, as in the ToMe paper.

    Args:
        tokens, metric: lists of (C,) / (d,) tensors, one per patch token.
        sizes: list of floats; members: list of sets of original patches.

    Returns:
        The new ``tokens, metric, sizes, members`` in the order [unmerged A..., B...].
    """
    A, Bs = list(range(0, len(tokens), 2)), list(range(1, len(tokens), 2))
    best = {}
    for a in A:
        sims = [float(F.cosine_similarity(metric[a], metric[b], dim=0)) for b in Bs]
        j = max(range(len(Bs)), key=lambda i: sims[i])
        best[a] = (sims[j], Bs[j])
    merged_a = sorted(A, key=lambda a: -best[a][0])[:r]
    out_b = {b: (tokens[b] * sizes[b], sizes[b], set(members[b])) for b in Bs}
    for a in merged_a:
        b = best[a][1]
        acc, s, mem = out_b[b]
        out_b[b] = (acc + tokens[a] * sizes[a], s + sizes[a], mem | members[a])
    keep_a = [a for a in A if a not in merged_a]
    new_tokens = [tokens[a] for a in keep_a] + [out_b[b][0] / out_b[b][1] for b in Bs]
    new_metric = [metric[a] for a in keep_a] + [metric[b] for b in Bs]  # caller replaces it
    new_sizes = [sizes[a] for a in keep_a] + [out_b[b][1] for b in Bs]
    new_members = [members[a] for a in keep_a] + [out_b[b][2] for b in Bs]
    return new_tokens, new_metric, new_sizes, new_members


def test_tome_two_merges_match_the_reference_and_are_size_weighted_means():
    B, hw = 3, (4, 5)
    N = 20
    g = torch.Generator().manual_seed(5)
    orig = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    cls = torch.randn(B, 1, C, generator=g, dtype=torch.float64)
    x, state = torch.cat([cls, orig], 1), init_state(B, hw, orig.device)
    # Step 1 on the tokens themselves, step 2 on a different metric (any metric must work).
    x1, st1, rec1 = tome_merge(x, state, x[:, 1:], keep=12)
    metric2 = torch.randn(B, 12, 5, generator=g, dtype=torch.float64)
    x2, st2, rec2 = tome_merge(x1, st1, metric2, keep=7)
    assert x2.shape == (B, 1 + 7, C)
    assert_close(x2[:, 0], cls[:, 0], atol=0, rtol=0)
    for b in range(B):
        toks = list(orig[b])
        sizes, members = [1.0] * N, [{p} for p in range(N)]
        toks, _, sizes, members = ref_tome(toks, toks, sizes, members, N - 12)
        toks, _, sizes, members = ref_tome(toks, list(metric2[b]), sizes, members, 12 - 7)
        for j in range(7):
            # Merging accumulates in float32 (as fold_tokens does), hence float32 tolerances.
            assert_close(x2[b, 1 + j], toks[j], atol=1e-6, rtol=1e-6)
            # Size-weighted means compose: a merged token is the plain mean of its originals.
            assert_close(x2[b, 1 + j], orig[b, sorted(members[j])].mean(0), atol=1e-6,
                         rtol=1e-6)  # fmt: skip
            # The source map sends exactly its members to it, and its size counts them.
            assert set((st2.source[b] == j).nonzero().flatten().tolist()) == members[j]
            assert float(st2.patch_size[b, j]) == sizes[j] == len(members[j])
            assert int(st2.patch_idx[b, j]) in members[j]
        grid = restore_tokens(x2[:, 1:], st2.source)
        for p in range(N):
            assert torch.equal(grid[b, p], x2[b, 1 + int(st2.source[b, p])])
    assert rec2.folded.shape == (B, 5) and rec1.folded.shape == (B, 8)


def test_tome_key_bias_is_log_size_and_enters_the_next_attention():
    B, hw = 2, (4, 4)
    x, stats, state = make_inputs(B, hw, seed=6)
    x, st, _ = ToMeReducer(0.6)(x.float(), AttnStats(*(t.float() for t in stats[:2]), SCALE,
                                                      None), state)  # fmt: skip
    bias = st.key_bias()
    assert bias.shape == (B, 1 + st.num_patches)
    assert torch.equal(bias[:, 0], torch.zeros(B))
    assert_close(bias[:, 1:], st.patch_size.log(), atol=0, rtol=0)
    assert (st.patch_size > 1).any()  # some tokens were merged: the test is not vacuous
    # Proportional attention: the next block's attention is softmax(q kᵀ·scale + log size) v.
    torch.manual_seed(7)
    blk = Block(C, HEADS, reweight=None, fused_attn=True).eval()
    with torch.no_grad():
        got, _, _ = blk(x, st)
        h = blk.norm1(x)
        qkv = blk.attn.qkv(h).reshape(B, -1, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = ((q @ k.transpose(-2, -1)) * SCALE + bias[:, None, None]).softmax(-1)
        y = x + blk.attn.proj((a @ v).transpose(1, 2).reshape(B, -1, C))
        want = y + blk.mlp(blk.norm2(y))
        a_plain = ((q @ k.transpose(-2, -1)) * SCALE).softmax(-1)
        y_plain = x + blk.attn.proj((a_plain @ v).transpose(1, 2).reshape(B, -1, C))
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, y_plain + blk.mlp(blk.norm2(y_plain)), atol=1e-3)


def test_tome_rejects_more_than_half_and_dc_tokens():
    x, _, state = make_inputs(1, (4, 4), seed=8)
    with pytest.raises(ValueError, match="keep_ratio >= 0.5"):
        tome_merge(x, state, x[:, 1:], keep=7)
    dc_state = state.replace(dc_count=torch.ones(1, 1))
    with pytest.raises(ValueError, match="DC tokens"):
        tome_merge(x, dc_state, x[:, 1:], keep=10)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (dict(method="tome", keep_ratio=0.4), "keep_ratio"),
        (dict(method="tome", keep_ratio=(0.7, 0.49, 0.9)), "keep_ratio"),
        (dict(method="tome", restore="residual"), "restore"),
        (dict(method="evit_", keep_ratio=0.7), "method"),
    ],
)
def test_invalid_peer_combinations_raise_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=rf"reduction\.{key}="):
        ReductionConfig.from_dict(overrides)


# ---------------------------------------------------------------------------------------------
# Batch independence
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fatr", "evit", "tome"])
def test_reducer_outputs_do_not_depend_on_the_rest_of_the_batch(method):
    x, stats, state = make_inputs(4, (5, 5), seed=9)
    red = reducers()[method]
    out, st, _ = red(x, stats, state)
    for b in range(4):
        sl = slice(b, b + 1)
        one = AttnStats(stats.q[sl], stats.k[sl], SCALE, None)
        o1, s1, _ = red(x[sl], one, init_state(1, (5, 5), x.device))
        assert_close(out[sl], o1, atol=1e-12, rtol=1e-12)
        assert torch.equal(st.source[sl], s1.source)
        assert torch.equal(st.patch_idx[sl], s1.patch_idx)


def test_random_fold_is_batch_independent_given_the_scores():
    """``random`` draws new scores per call; given fixed scores its fold is per image."""
    x, _, state = make_inputs(4, (5, 6), seed=10)
    scores = torch.rand(4, 30, generator=torch.Generator().manual_seed(11))
    out, st, _ = fold_tokens(x, state, scores, keep=21, windows=2)
    for b in range(4):
        sl = slice(b, b + 1)
        o1, s1, _ = fold_tokens(x[sl], init_state(1, (5, 6), x.device), scores[sl], 21, 2)
        assert_close(out[sl], o1, atol=1e-12, rtol=1e-12)
        assert torch.equal(st.source[sl], s1.source)
    # The random reducer keeps a different set per call (it is random), of the same size.
    red = reducers()["random"]
    _, stats, _ = make_inputs(4, (5, 6), seed=10)
    torch.manual_seed(0)
    _, s_a, _ = red(x, stats, state)
    _, s_b, _ = red(x, stats, state)
    assert s_a.patch_idx.shape == s_b.patch_idx.shape == (4, 21)
    assert not torch.equal(s_a.patch_idx, s_b.patch_idx)


@pytest.mark.parametrize("method", ["fatr", "evit", "tome"])
def test_model_outputs_do_not_depend_on_the_rest_of_the_batch(method):
    torch.manual_seed(12)
    red = dict(method=method, layers=(2, 3), keep_ratio=0.6, windows=(2, 1),
               reweight=None if method == "tome" else "identity")  # fmt: skip
    model = FATRVisionTransformer(img_size=(40, 48), patch_size=8, embed_dims=C, num_layers=4,
                                  num_heads=HEADS, reduction=red).eval()  # fmt: skip
    imgs = torch.randn(3, 3, 40, 48, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        batch = model(imgs)[0]
        traces = model.reduction_trace(imgs)
        for b in range(3):
            assert_close(batch[b : b + 1], model(imgs[b : b + 1])[0], atol=1e-5, rtol=1e-5)
            alone = model.reduction_trace(imgs[b : b + 1])
            for ta, tb in zip(traces, alone, strict=True):
                assert torch.equal(ta.kept[b : b + 1], tb.kept)
