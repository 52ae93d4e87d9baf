"""The bipartite plan (issue 24: few kernels per reduction layer) against the composition it
replaces: score and partner arrays, ``select_topk``, ToMe's peer order and the index map."""

import pytest
import torch

from fatr_seg.ops import (
    bipartite_scores,
    init_state,
    merge_tokens,
    protected_bipartite_scores,
    select_topk,
)
from fatr_seg.ops.merge import bipartite_plan, merge_planned


def old_plan(metric, priority, protect, keep, peer_order):
    """The pre-issue-24 path: (B, M) scores and partners, top-k, peer order, index map."""
    M = metric.shape[1]
    if peer_order:
        scores, partner = bipartite_scores(metric)
    else:
        scores, partner = protected_bipartite_scores(metric, priority, protect)
    keep_pos, drop_pos = select_topk(scores, keep)
    if peer_order:  # ToMe: unmerged A tokens, then B tokens, each ascending
        pos = torch.arange(M).expand_as(scores)
        key = pos + M * (pos % 2 == 0)
        keep_pos = keep_pos.gather(1, key.gather(1, keep_pos).argsort(dim=1, stable=True))
    index = torch.zeros_like(scores, dtype=torch.long)
    index.scatter_(1, keep_pos, torch.arange(keep).expand_as(keep_pos))
    dst = index.gather(1, partner.gather(1, drop_pos))
    return scores, keep_pos, drop_pos, dst


def metrics(B, M, d, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(B, M, d, generator=gen)
    if ties:  # repeated rows: equal similarities everywhere, so tie-breaking decides
        m = m[:, torch.randint(0, max(2, M // 4), (M,), generator=gen)]
    priority = torch.randn(B, M, generator=gen)
    if ties:
        priority = priority.round()
    return m, priority


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    ("M", "protect", "keep", "peer_order"),
    [(16, 0, 10, True), (17, 0, 9, True), (16, 0, 12, False), (30, 6, 21, False),
     (31, 7, 20, False), (9, 3, 7, False), (12, 0, 6, True), (20, 4, 12, False)],
)  # fmt: skip
def test_plan_equals_the_old_composition(M, protect, keep, peer_order, ties):
    for seed in range(4):
        metric, priority = metrics(3, M, 8, ties, seed)
        scores, keep_pos, drop_pos, dst = old_plan(metric, priority, protect, keep, peer_order)
        plan = bipartite_plan(metric, priority, protect, keep, peer_order)
        assert plan.num_keep == keep
        assert torch.equal(plan.perm[:, :keep], keep_pos)
        assert torch.equal(plan.perm[:, keep:], drop_pos)
        assert torch.equal(plan.old_to_new.gather(1, drop_pos), dst)
        assert torch.equal(
            plan.old_to_new.gather(1, keep_pos), torch.arange(keep).expand_as(keep_pos)
        )
        assert torch.equal(plan.scores(), scores)


@pytest.mark.parametrize("sized", [False, True])
@pytest.mark.parametrize("dc", [0, 3])
def test_planned_merge_equals_merge_tokens(sized, dc):
    torch.manual_seed(0)
    B, M, C, protect, keep = 2, 20, 6, 4, 13
    metric, priority = metrics(B, M, 8, False, 1)
    state = init_state(B, (4, 5), torch.device("cpu"))
    if sized or dc:  # a state after some step: sizes, DC tokens, a permuted source map
        perm = torch.randperm(M).expand(B, M)
        state = state.replace(
            source=perm.clone(), patch_idx=perm.clone(),
            patch_size=torch.randint(1, 4, (B, M)).float() if sized else None,
            dc_count=torch.ones(B, dc),
        )  # fmt: skip
    x = torch.randn(B, 1 + M + dc, C, dtype=torch.float64)
    _, keep_pos, drop_pos, dst = old_plan(metric, priority, protect, keep, False)
    scores = protected_bipartite_scores(metric, priority, protect)[0]
    want = merge_tokens(x, state, keep_pos, drop_pos, dst, scores, keep_residual=True)
    got = merge_planned(x, state, bipartite_plan(metric, priority, protect, keep), True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-13, atol=1e-13)
    for name in ("source", "patch_idx", "patch_size", "residual", "dc_count"):
        torch.testing.assert_close(getattr(got[1], name), getattr(want[1], name))
    for a, b in zip(got[2], want[2], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sized", [False, True])
def test_merged_sizes_give_the_padded_log_as_key_bias(sized):
    """The sizes' buffer holds CLS's 1, so the key bias is one log: equal to the padded log."""
    B, M, keep = 2, 20, 13
    metric, priority = metrics(B, M, 8, False, 2)
    state = init_state(B, (4, 5), torch.device("cpu"))
    if sized:
        state = state.replace(patch_size=torch.randint(1, 4, (B, M)).float())
    for _ in range(2):  # a second merge must not see the first one's writes in the cached row
        x = torch.randn(B, 1 + M, 6)
        _, new, _ = merge_planned(x, state, bipartite_plan(metric, priority, 4, keep))
        assert new.cls_sizes.shape == (B, 1 + keep)
        assert torch.equal(new.cls_sizes[:, 0], torch.ones(B))
        assert new.patch_size.data_ptr() == new.cls_sizes[:, 1:].data_ptr()
        padded = torch.nn.functional.pad(new.patch_size.log(), (1, 0))
        assert torch.equal(new.key_bias(), padded)
        assert new.patch_size.sum() == (state.sizes().sum())  # every patch counted once
    # New sizes without their buffer drop it, so no stale bias is built from it.
    halved = new.replace(patch_size=new.patch_size / 2)
    assert halved.cls_sizes is None
    assert torch.equal(halved.key_bias(), torch.nn.functional.pad(halved.patch_size.log(), (1, 0)))


def test_cached_constants_are_not_cached_while_compiling():
    from fatr_seg.ops.constants import cached_constant

    calls = []

    def build():
        calls.append(1)
        return torch.arange(3)

    a = cached_constant(("test-only", 3), "cpu", build)
    assert cached_constant(("test-only", 3), "cpu", build) is a and len(calls) == 1

    @torch.compile(backend="eager", fullgraph=True)
    def traced(x):
        return x + cached_constant(("test-only", 4), x.device, lambda: torch.ones(3))

    torch.testing.assert_close(traced(torch.zeros(3)), torch.ones(3))
    from fatr_seg.ops import constants

    assert (("test-only", 4), torch.device("cpu")) not in constants._CACHE


def test_record_is_built_only_when_read():
    """The record's fields are functions until read: a forward that ignores it pays nothing."""
    metric, priority = metrics(1, 12, 4, False, 0)
    state = init_state(1, (3, 4), torch.device("cpu"))
    x = torch.randn(1, 13, 5)
    _, _, record = merge_planned(x, state, bipartite_plan(metric, priority, 2, 8))
    assert all(callable(v) for v in record._values[1:4])
    kept, kept_scores, folded, folded_window, source = record
    assert kept_scores.shape == (1, 8) and folded.shape == folded_window.shape == (1, 4)
    assert record[1] is kept_scores and len(record) == 5


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(("hw", "window", "folds"), [((4, 6), 2, 3), ((5, 7), 2, 6), ((6, 6), 3, 2),
                                                    ((4, 4), 2, 4), ((4, 4), 2, 0)])  # fmt: skip
def test_window_plan_equals_scores_topk_and_partners(hw, window, folds, ties):
    from fatr_seg.ops import window_fold_plan, window_fold_scores, window_members
    from fatr_seg.ops.merge import partner_plan

    N = hw[0] * hw[1]
    win = window_members(hw, window)
    drop = folds * (window * window - 1)
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        priority = torch.randn(3, win.shape[0], generator=gen)
        if ties:
            priority = priority.round()
        scores, partner = window_fold_scores(priority, win, N)
        keep_pos, drop_pos = select_topk(scores, N - drop)
        want = partner_plan(keep_pos, drop_pos, partner, scores)
        plan = window_fold_plan(priority, hw, window, drop)
        assert plan.num_keep == want.num_keep == N - drop
        assert torch.equal(plan.perm, want.perm)
        assert torch.equal(plan.old_to_new, want.old_to_new)
        assert torch.equal(plan.scores(), scores)


@pytest.mark.parametrize(("hw", "window"), [((4, 6), 2), ((5, 7), 2), ((7, 6), 3), ((1, 6), 2)])
def test_window_priority_is_the_members_max(hw, window):
    from fatr_seg.ops import window_hf_priority, window_members

    hf = torch.rand(2, hw[0] * hw[1], generator=torch.Generator().manual_seed(hw[1]))
    win = window_members(hw, window)
    want = hf[:, win].amax(-1) if win.shape[0] else hf[:, :0]
    assert torch.equal(window_hf_priority(hf, hw, window), want)


def test_window_plan_refuses_part_of_a_window():
    from fatr_seg.ops import window_fold_plan

    with pytest.raises(ValueError, match="5 tokens are no whole number of the 4 windows of 4"):
        window_fold_plan(torch.zeros(1, 4), (4, 4), 2, 5)
