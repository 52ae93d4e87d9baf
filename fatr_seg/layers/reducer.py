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
        return s[:, 1 : 1 + M]

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
