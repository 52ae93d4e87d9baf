"""The explicit state that travels with the token sequence through a reduced ViT."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["TokenState", "init_state"]


@dataclass(frozen=True)
class TokenState:
    """Where every original patch lives in the current token sequence.

    The sequence is ``[CLS, HF patch tokens (M), DC tokens (D)]``, shape (B, 1 + M + D, C).
    Positions below are indices into ``x[:, 1:]`` (the sequence without CLS).

    Attributes:
        hw_shape: Original patch grid (H, W); ``N = H · W``.
        source: (B, N) long. For each original patch, the position of the token that represents it
            now: itself while it is an HF token, its DC token once it was folded.
        patch_idx: (B, M) long. Original-grid index of each HF token, ascending.
        dc_count: (B, D) float32. Number of original patches folded into each DC token.
        windows: DC windows per side of the current DC tokens (0 while there are none).
        residual: (B, N, C) or None. For a folded patch, its feature when it was removed minus its
            DC token's value then; zero for HF patches. Kept only for ``restore='residual'``.
    """

    hw_shape: tuple[int, int]
    source: torch.Tensor
    patch_idx: torch.Tensor
    dc_count: torch.Tensor
    windows: int = 0
    residual: torch.Tensor | None = None

    @property
    def num_patches(self) -> int:
        """M, the number of HF patch tokens in the sequence."""
        return self.patch_idx.shape[1]

    @property
    def num_dc(self) -> int:
        """D, the number of DC tokens at the end of the sequence."""
        return self.dc_count.shape[1]

    def key_bias(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Additive attention bias (B, 1 + M + D) that removes empty DC tokens, or None.

        A DC window with no folded patch yet holds no information; it must not receive attention.
        Returns None (so the fastest fused kernel runs) when every DC token is populated.
        """
        if self.num_dc == 0 or bool((self.dc_count > 0).all()):
            return None
        B = self.dc_count.shape[0]
        bias = self.dc_count.new_zeros(B, 1 + self.num_patches + self.num_dc, dtype=dtype)
        bias[:, 1 + self.num_patches :] = torch.where(self.dc_count > 0, 0.0, float("-inf"))
        return bias

    def replace(self, **changes) -> TokenState:
        return replace(self, **changes)


def init_state(batch: int, hw_shape: tuple[int, int], device: torch.device) -> TokenState:
    """State of an unreduced sequence: every patch is its own HF token."""
    N = hw_shape[0] * hw_shape[1]
    idx = torch.arange(N, device=device).expand(batch, N)
    return TokenState(
        hw_shape=tuple(hw_shape),
        source=idx,
        patch_idx=idx,
        dc_count=torch.zeros(batch, 0, device=device),
    )
