"""The reduction step inside a block: score tokens, keep the HF ones, fold the rest into DC."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.reduce import FoldRecord, fold_tokens, num_keep
from ..ops.scoring import hf_scores
from ..ops.state import TokenState
from .attention import AttnStats

__all__ = ["FrequencyTokenReducer"]


class FrequencyTokenReducer(nn.Module):
    """One FATR reduction layer.

    Keeps the top ``ceil(keep_ratio · M)`` patch tokens by HF score (M counted at forward time, so
    any input size works) and folds the rest into ``windows × windows`` local DC tokens.

    Args:
        dim: Embedding dim C.
        keep_ratio: Fraction of present patch tokens to keep, in (0, 1].
        windows: DC windows per side after this layer.
        score: ``'exact'`` (attention column mean, exact and memory-bounded) or
            ``'logit_proxy'``; ignored by ``method='random'``.
        method: ``'fatr'`` or ``'random'`` (random keep, same DC aggregation; a control).
        keep_residual: Track what ``restore='residual'`` needs.
    """

    def __init__(
        self,
        dim: int,
        keep_ratio: float = 0.7,
        windows: int = 2,
        score: str = "exact",
        method: str = "fatr",
        keep_residual: bool = False,
    ) -> None:
        super().__init__()
        self.keep_ratio = keep_ratio
        self.windows = windows
        self.score = score
        self.method = method
        self.keep_residual = keep_residual
        # The paper adds an unspecified positional term to DC tokens: a learnable per-window
        # embedding, zero-initialised so a pretrained model is unchanged at the start.
        self.dc_pos = nn.Parameter(torch.zeros(windows * windows, dim))

    def scores(
        self, stats: AttnStats, state: TokenState, key_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """HF score of each patch token, (B, M)."""
        M = state.num_patches
        if self.method == "random":
            return torch.rand(stats.q.shape[0], M, device=stats.q.device)
        s = hf_scores(stats.q, stats.k, stats.scale, self.score, key_bias, lse=stats.lse)
        if key_bias is not None and state.empty_dc_windows():
            s = self.without_empty_queries(s, stats, key_bias, state.num_dc)
        return s[:, 1 : 1 + M]

    @torch.no_grad()
    def without_empty_queries(
        self, s: torch.Tensor, stats: AttnStats, key_bias: torch.Tensor, num_dc: int
    ) -> torch.Tensor:
        """Take the query rows of empty DC tokens out of the scores ``s`` (B, n).

        An empty DC window (count 0) is masked as a key, but it is still a query; its query is
        built from its positional term alone and must not vote in the column mean.
        """
        empty = ~torch.isfinite(key_bias[:, -num_dc:])  # (B, D); some element has one
        B, h, n, _ = stats.k.shape
        q_dc = stats.q[:, :, -num_dc:].float()  # (B, h, D, d)
        logits = q_dc @ stats.k.float().transpose(-2, -1) * stats.scale  # (B, h, D, n)
        w = empty[:, None, :, None].float()  # (B, 1, D, 1)
        if self.score == "logit_proxy":  # s = mean_h (sum_q q) . k * scale
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
    ) -> tuple[torch.Tensor, TokenState, FoldRecord]:
        """Reduce ``x`` (B, 1 + M + D, C) to (B, 1 + K + windows², C).

        Args:
            x: The sequence after the attention sub-block.
            stats: Detached statistics of that attention (q, k, scale, row log-sum-exp).
            state: The sequence's state.
            key_bias: The attention's key bias, (B, n) or None.
        """
        M, D = state.num_patches, state.num_dc
        keep = num_keep(self.keep_ratio, M)
        scores = self.scores(stats, state, key_bias)
        if keep == M and (D == 0 or state.windows == self.windows):
            # Nothing to fold and no DC grid to change: leave the sequence exactly as it is.
            empty = state.patch_idx[:, :0]
            rec = FoldRecord(state.patch_idx, scores, empty, empty, state.source)
            return x, state, rec
        return fold_tokens(
            x, state, scores, keep, self.windows, self.dc_pos, keep_residual=self.keep_residual,
            weights=self.fusion_weights(scores),
        )  # fmt: skip

    def fusion_weights(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Per-token weights for the DC means; FATR's DC tokens are plain means (None)."""
        return None
