"""Peer reducers (EViT, ToMe) on the same state, restoration and kernels as FATR."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.peers import cls_attention, tome_merge
from ..ops.reduce import FoldRecord, num_keep
from ..ops.state import TokenState
from .attention import AttnStats
from .config import ReductionConfig
from .reducer import FrequencyTokenReducer

__all__ = ["EViTReducer", "ToMeReducer", "build_reducer"]


class EViTReducer(FrequencyTokenReducer):
    """EViT: keep the top-k patch tokens by CLS attention, fuse the rest into ONE token.

    The fused token is the attention-weighted mean of the inattentive tokens (and of the previous
    fused token, by its total weight). ``windows`` is always 1 and no positional term is added.
    """

    def __init__(self, dim: int, keep_ratio: float = 0.7, keep_residual: bool = False) -> None:
        super().__init__(dim, keep_ratio, 1, "exact", "evit", keep_residual)
        self.dc_pos = None

    def scores(
        self, stats: AttnStats, state: TokenState, key_bias: torch.Tensor | None
    ) -> torch.Tensor:
        M = state.num_patches
        return cls_attention(stats.q, stats.k, stats.scale, key_bias)[:, 1 : 1 + M]

    def fusion_weights(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


class ToMeReducer(nn.Module):
    """ToMe: bipartite soft matching on the keys, size-weighted merging, proportional attention.

    Merges ``M - ceil(keep_ratio · M)`` tokens at this layer (the same budget as FATR's
    selection), so methods are compared at the same token count.
    """

    def __init__(self, keep_ratio: float = 0.7) -> None:
        super().__init__()
        self.keep_ratio = keep_ratio

    def forward(
        self,
        x: torch.Tensor,
        stats: AttnStats,
        state: TokenState,
        key_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, TokenState, FoldRecord]:
        M = state.num_patches
        keep = num_keep(self.keep_ratio, M)
        if keep == M:
            empty = state.patch_idx[:, :0]
            zeros = torch.zeros_like(state.patch_idx, dtype=torch.float32)
            return x, state, FoldRecord(state.patch_idx, zeros, empty, empty, state.source)
        metric = stats.k.mean(dim=1)[:, 1 : 1 + M]  # (B, M, d): keys averaged over heads
        return tome_merge(x, state, metric, keep)


def build_reducer(cfg: ReductionConfig, j: int, dim: int) -> nn.Module:
    """The reducer of the ``j``-th reduction layer for ``cfg.method``."""
    residual = cfg.restore == "residual"
    if cfg.method == "evit":
        return EViTReducer(dim, cfg.keep_ratio[j], residual)
    if cfg.method == "tome":
        return ToMeReducer(cfg.keep_ratio[j])
    return FrequencyTokenReducer(
        dim, cfg.keep_ratio[j], cfg.windows[j], cfg.score, cfg.method, keep_residual=residual
    )
