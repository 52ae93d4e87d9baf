"""Pre-norm transformer block with an optional reduction between attention and MLP."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn

from ..ops.reduce import ReductionRecord
from ..ops.state import TokenState
from .attention import Attention
from .reducer import TokenReducer

__all__ = ["Block"]


class Block(nn.Module):
    """timm-compatible ViT block (``norm1, attn, ls1, norm2, mlp, ls2``).

    At a reduction layer the reducer runs after the attention sub-block and before the MLP, so the
    MLP already runs on the reduced set (the placement that reproduces the paper's MACs).

    Args:
        dim: Embedding dim C.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden size / C.
        qkv_bias: Bias on qkv.
        drop: Dropout after the attention projection and in the MLP.
        drop_path: Stochastic depth rate.
        init_values: LayerScale init; None disables LayerScale.
        reweight: Attention reweighting mode of this block (None before the first reduction).
        reducer: The reduction of this block, or None.
        dc_terms: Whether the sequence can hold DC tokens (reweighting then has ``omega2``).
        fused_attn: Use fused attention (None reads ``FATR_FUSED_ATTN``).
        attn_drop: Dropout on the attention probabilities.
        proj_bias: Bias on the attention's output projection.
        act_layer: The MLP's activation (a module class or factory).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        reweight: str | None = None,
        reducer: TokenReducer | None = None,
        dc_terms: bool = True,
        fused_attn: bool | None = None,
        attn_drop: float = 0.0,
        proj_bias: bool = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, reweight, dc_terms,
                              fused_attn, proj_bias)  # fmt: skip
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.reducer = reducer
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, state: TokenState, coef_hp: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, TokenState, ReductionRecord | None]:
        """Run the block on ``x`` (B, 1 + M + D, C); returns the (possibly reduced) sequence.

        ``coef_hp``: the reweighting's ``1 + omega1`` if the caller computed it.
        """
        key_bias = state.key_bias(torch.float32)
        reduces = self.reducer is not None and self.reducer.active
        y, stats = self.attn(self.norm1(x), key_bias, state.num_dc, reduces, coef_hp)
        x = x + self.drop_path1(self.ls1(y))
        # Release the attention output and the scoring statistics (q and k, i.e. the qkv buffer)
        # before the MLP: otherwise they are alive at the MLP's peak and FATR's peak memory at
        # 4096 tokens exceeds the baseline's (docs/benchmarks.md, "Memory").
        del y
        record = None
        if reduces:
            x, state, record = self.reducer(x, stats, state, key_bias)
        del stats
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, state, record
