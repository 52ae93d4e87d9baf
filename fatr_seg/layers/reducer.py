"""The reduction step inside a block: one score, one aggregation (see :mod:`.config`)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import (
    MergePlan,
    ReductionRecord,
    TokenState,
    bipartite_plan,
    bipartite_scores,
    cls_attention,
    float32_matmul,
    fold_tokens,
    fuse_tokens,
    hf_scores,
    merge_planned,
    merge_tokens,
    nearest_kept,
    num_windows,
    partner_plan,
    protected_bipartite_scores,
    select_topk,
    window_fold_plan,
    window_fold_scores,
    window_hf_priority,
    window_members,
    window_scores,
)
from .attention import AttnStats
from .config import WHOLE_WINDOW_SCORES, ReductionConfig

__all__ = ["TokenReducer"]

# Scores whose merges run as one bipartite plan (:func:`fatr_seg.ops.bipartite_plan`).
_PAIR_SCORES = ("bipartite", "hf_bipartite", "random_bipartite")


class TokenReducer(nn.Module):
    """Reduction layer ``j`` of a :class:`ReductionConfig`.

    Keeps the top patch tokens by the layer's score (the budget is counted at forward time from
    the tokens present, so any input size works) and aggregates the others.

    Args:
        cfg: The reduction config.
        j: Which of its reduction layers this is (0-based).
        dim: Embedding dim C.

    Attributes:
        dc_pos: For ``'dc'`` layers, the learnable positional term of the DC tokens,
            zero-initialised so a pretrained model is unchanged at the start: one per window for
            windows per side, one shared vector for windows by size (their number depends on the
            input size). None for other aggregations.
    """

    def __init__(self, cfg: ReductionConfig, j: int, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.j = j
        grid = cfg.dc_grid(j)
        self.dc_pos = None
        if grid is not None:
            num = grid[1] ** 2 if grid[0] == "side" else 1
            self.dc_pos = nn.Parameter(torch.zeros(num, dim))

    @property
    def active(self) -> bool:
        """Whether this layer reduces now: always in eval mode, in training mode only with
        ``reduce_in_training`` (its block then skips the scoring statistics too)."""
        return not self.training or self.cfg.reduce_in_training

    @property
    def score(self) -> str:
        return self.cfg.score[self.j]

    @property
    def aggregate(self) -> str:
        return self.cfg.aggregate[self.j]

    def extra_repr(self) -> str:
        budget = (f"keep_ratio={self.cfg.keep_ratio[self.j]}" if self.cfg.keep_ratio
                  else f"r={self.cfg.r[self.j]}")  # fmt: skip
        return f"score={self.score!r}, aggregate={self.aggregate!r}, {budget}"

    def metric(self, x: torch.Tensor, stats: AttnStats, M: int) -> torch.Tensor:
        """(B, M, d) similarity features of the patch tokens."""
        if self.cfg.metric == "keys":
            return stats.k.mean(dim=1)[:, 1 : 1 + M]
        return x[:, 1 : 1 + M].detach()

    @torch.no_grad()
    def scores(
        self, x: torch.Tensor, stats: AttnStats, state: TokenState, key_bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Scores (B, M), proposed partner positions (B, M) or None, fusion weights or None."""
        M = state.num_patches
        if self.score in ("random", "random_bipartite"):
            s = torch.rand(x.shape[0], M, device=x.device)
            if self.score == "random":
                return s, None, None
            protect = self.cfg.num_protected(M, self.cfg.num_keep(self.j, M))
            return (*protected_bipartite_scores(self.metric(x, stats, M), s, protect), None)
        if self.score == "cls":
            attn = cls_attention(stats.q, stats.k, stats.scale, key_bias)[:, 1 : 1 + M]
            return attn, None, attn
        if self.score == "bipartite":
            return (*bipartite_scores(self.metric(x, stats, M)), None)
        if self.score == "window":
            window = self.cfg.local_window
            return (*window_scores(self.metric(x, stats, M), state.hw_shape, window), None)
        if self.score == "window_random":
            win = window_members(state.hw_shape, self.cfg.local_window, x.device)
            priority = torch.rand(x.shape[0], win.shape[0], device=x.device)
            return (*window_fold_scores(priority, win, M), None)
        if self.score == "hf_bipartite":
            protect = self.cfg.num_protected(M, self.cfg.num_keep(self.j, M))
            if protect == 0:  # the budget left nothing to protect: no HF score to read
                priority = torch.zeros(x.shape[0], M, device=x.device)
                return (*protected_bipartite_scores(self.metric(x, stats, M), priority, 0), None)
        method = "logit_proxy" if self.score == "hf_proxy" else "exact"  # hf, window_hf too
        s = self.hf_score(stats, state, key_bias, method)
        if self.score == "window_hf":
            window = self.cfg.local_window
            win = window_members(state.hw_shape, window, x.device)
            priority = window_hf_priority(s, state.hw_shape, window)
            return (*window_fold_scores(priority, win, M), None)
        if self.score == "hf_bipartite":
            return (*protected_bipartite_scores(self.metric(x, stats, M), s, protect), None)
        return s, None, None

    def without_empty_queries(
        self, s: torch.Tensor, stats: AttnStats, key_bias: torch.Tensor, num_dc: int
    ) -> torch.Tensor:
        """Take the query rows of empty DC tokens out of the HF scores ``s`` (B, n).

        An empty DC window (count 0) is masked as a key, but it is still a query; its query is
        built from its positional term alone and must not vote in the column mean. Computed
        whether or not some window is empty (an empty set removes nothing), so that no value is
        read on the host.
        """
        empty = ~torch.isfinite(key_bias[:, -num_dc:])  # (B, D)
        B, h, n, _ = stats.k.shape
        q_dc = stats.q[:, :, -num_dc:].float()  # (B, h, D, d)
        logits = float32_matmul(q_dc, stats.k.float().transpose(-2, -1)) * stats.scale  # (B,h,D,n)
        w = empty[:, None, :, None].float()  # (B, 1, D, 1)
        if self.score == "hf_proxy":  # s = mean_h (sum_q q) . k * scale
            return s - (logits * w).sum(dim=(1, 2)) / h
        rows = (logits + key_bias[:, None, None, :].float()).softmax(dim=-1)  # (B, h, D, n)
        removed = (rows * w).sum(dim=(1, 2))  # (B, n)
        valid = (n - empty.sum(dim=1, keepdim=True)).float()  # (B, 1)
        return (s * (h * n) - removed) / (h * valid)

    def forward(
        self,
        x: torch.Tensor,
        stats: AttnStats,
        state: TokenState,
        key_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, TokenState, ReductionRecord]:
        """Reduce ``x`` (B, 1 + M + D, C) after the block's attention sub-block.

        Args:
            x: The sequence after the attention sub-block.
            stats: Detached statistics of that attention (q, k, scale, row log-sum-exp).
            state: The sequence's state.
            key_bias: The attention's key bias, (B, n) or None.
        """
        M = state.num_patches
        keep = self.cfg.num_keep(self.j, M, state.hw_shape)
        grid = self.cfg.dc_grid(self.j)
        if not self.active or (
            keep == M and (grid is None or state.num_dc == 0 or state.dc_grid == grid)
        ):
            # Nothing to aggregate and no DC grid to change: leave the sequence exactly as it is.
            empty = state.patch_idx[:, :0]
            scores = torch.zeros(state.patch_idx.shape, device=x.device)
            return x, state, ReductionRecord(state.patch_idx, scores, empty, empty, state.source)
        if self.score in _PAIR_SCORES or self.score in WHOLE_WINDOW_SCORES:
            make = self.pair_plan if self.score in _PAIR_SCORES else self.window_plan
            with torch.no_grad():
                plan = make(x, stats, state, key_bias, keep)
            return merge_planned(x, state, plan, self.cfg.restore == "residual",
                                 self.cfg.prop_attn)  # fmt: skip
        scores, partner, weights = self.scores(x, stats, state, key_bias)
        keep_pos, drop_pos = select_topk(scores, keep)
        if self.score in ("bipartite", "window"):
            keep_pos = self.peer_order(keep_pos, drop_pos, scores, partner)
        residual = self.cfg.restore == "residual"
        if self.aggregate == "dc":
            return fold_tokens(x, state, keep_pos, drop_pos, scores, grid, self.dc_pos, residual)
        if self.aggregate == "fuse":
            return fuse_tokens(x, state, keep_pos, drop_pos, weights, scores, residual)
        if partner is not None:  # every dropped token joins its partner's new position
            plan = partner_plan(keep_pos, drop_pos, partner, scores)
            return merge_planned(x, state, plan, residual, self.cfg.prop_attn)
        with torch.no_grad():
            radius = self.cfg.merge_radius
            dst = nearest_kept(self.metric(x, stats, M), keep_pos, drop_pos,
                               state.patch_idx, state.hw_shape, radius)  # fmt: skip
        return merge_tokens(x, state, keep_pos, drop_pos, dst, scores, residual,
                            self.cfg.prop_attn)  # fmt: skip

    def pair_plan(
        self, x: torch.Tensor, stats: AttnStats, state: TokenState,
        key_bias: torch.Tensor | None, keep: int,
    ) -> MergePlan:  # fmt: skip
        """The bipartite scores' merges as a :class:`MergePlan` (the same split, partners and
        order as :meth:`scores`, :func:`select_topk` and :meth:`peer_order`, in few kernels)."""
        M = state.num_patches
        if self.score == "bipartite":
            return bipartite_plan(self.metric(x, stats, M), None, 0, keep, peer_order=True)
        protect = self.cfg.num_protected(M, keep)
        priority = None
        if self.score == "random_bipartite":
            priority = torch.rand(x.shape[0], M, device=x.device)
        elif protect:
            priority = self.hf_score(stats, state, key_bias)
        return bipartite_plan(self.metric(x, stats, M), priority, protect, keep)

    def window_plan(
        self, x: torch.Tensor, stats: AttnStats, state: TokenState,
        key_bias: torch.Tensor | None, keep: int,
    ) -> MergePlan:  # fmt: skip
        """The whole-window scores' folds as a :class:`MergePlan` (the same as :meth:`scores`,
        :func:`select_topk` and :func:`partner_plan`, in few kernels)."""
        M, hw, window = state.num_patches, state.hw_shape, self.cfg.local_window
        if self.score == "window_random":
            priority = torch.rand(x.shape[0], num_windows(hw, window), device=x.device)
        else:
            priority = window_hf_priority(self.hf_score(stats, state, key_bias), hw, window)
        return window_fold_plan(priority, hw, window, M - keep)

    def hf_score(
        self, stats: AttnStats, state: TokenState, key_bias: torch.Tensor | None,
        method: str = "exact",
    ) -> torch.Tensor:  # fmt: skip
        """(B, M) HF scores of the patch tokens: exact, or estimated from ``score_queries``
        strided query rows (:func:`fatr_seg.ops.query_rows`), or the logit proxy."""
        M = state.num_patches
        queries = self.cfg.score_queries if method == "exact" else None
        sizes = None
        if (
            key_bias is not None
            and not state.num_dc
            and stats.lse is not None
            and method == "exact"
        ):
            # The bias is log(size): exp(l + log s - lse) = s · exp(l - lse), so the sizes scale
            # the column means instead of a pass over every logit.
            sizes, key_bias = state.patch_size, None
        if queries is not None and state.num_dc:
            # The estimate's rows come from CLS and the patches, so no empty DC window votes.
            lse = None if stats.lse is None else stats.lse[:, :, : 1 + M]
            stats = stats._replace(q=stats.q[:, :, : 1 + M], lse=lse)
        s = hf_scores(stats.q, stats.k, stats.scale, method, key_bias, lse=stats.lse,
                      queries=queries)  # fmt: skip
        if state.num_dc and queries is None:
            s = self.without_empty_queries(s, stats, key_bias, state.num_dc)
        return s[:, 1 : 1 + M] if sizes is None else s[:, 1 : 1 + M] * sizes

    @torch.no_grad()
    def peer_order(
        self, keep_pos: torch.Tensor, drop_pos: torch.Tensor, scores: torch.Tensor,
        partner: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The order of the kept tokens in the merged sequence, as the peers' code has it.

        It matters for the next bipartite split, which alternates over sequence positions.
        ToMe (and ALGM's global step): the unmerged A tokens, then the B tokens, each in sequence
        order. ALGM's local step: the windows that merged, most similar first, then the other
        tokens in sequence order.
        """
        M = scores.shape[1]
        pos = torch.arange(M, device=scores.device, dtype=torch.float64).expand_as(scores)
        if self.score == "bipartite":
            key = pos + M * (pos.long() % 2 == 0)  # B tokens (even positions) after A tokens
        else:
            absorbs = torch.zeros_like(scores, dtype=torch.bool)
            absorbs.scatter_(1, partner.gather(1, drop_pos), True)
            # A window member scores minus the window's similarity; its partner scores inf.
            member_sim = torch.zeros_like(pos).scatter_reduce(
                1, partner, -scores.double(), "amax", include_self=False
            )
            key = torch.where(absorbs, -2.0 - member_sim, pos)
        order = key.gather(1, keep_pos).argsort(dim=1, stable=True)
        return keep_pos.gather(1, order)
