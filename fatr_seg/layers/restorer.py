"""Token restoration: reduced sequence -> full-grid NCHW map for stock mmseg decode heads."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.restore import restore_tokens
from ..ops.state import TokenState

__all__ = ["TokenRestorer"]


class TokenRestorer(nn.Module):
    """Scatter HF and DC tokens back onto the patch grid.

    Args:
        mode: ``'copy'`` (each aggregated patch gets the token that represents it) or
            ``'residual'`` (plus what it lacked when it was aggregated; see
            :func:`fatr_seg.ops.accumulate_residual`).
    """

    def __init__(self, mode: str = "copy") -> None:
        super().__init__()
        if mode not in ("copy", "residual"):
            raise ValueError(f"restore={mode!r} is invalid: choose 'copy' or 'residual'")
        self.mode = mode

    def forward(
        self,
        x: torch.Tensor,
        state: TokenState,
        norm: nn.Module | None = None,
        num_prefix_tokens: int = 1,
    ) -> torch.Tensor:
        """Restore ``x`` (B, P + M + D, C) to (B, C, H, W), H, W = ``state.hw_shape``.

        ``norm`` (a per-token norm such as the backbone's final LayerNorm) is applied after the
        restoration, so that in ``'residual'`` mode the residual lives in the same space as the
        DC token it is added to. ``num_prefix_tokens`` (P) is 1 with a CLS token, 0 without.
        """
        B, _, C = x.shape
        H, W = state.hw_shape
        residual = state.residual if self.mode == "residual" else None
        grid = restore_tokens(x[:, num_prefix_tokens:], state.source, residual)  # (B, H*W, C)
        if norm is not None:
            grid = norm(grid)
        return grid.transpose(1, 2).reshape(B, C, H, W)
