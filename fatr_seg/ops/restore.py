"""Scatter a reduced token sequence back onto the full patch grid."""

from __future__ import annotations

import torch

__all__ = ["restore_tokens"]


def restore_tokens(
    tokens: torch.Tensor, source: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """One gather through the source map; no loop over images or tokens.

    Mode ``'dc'`` (``residual=None``): HF patches get their own token, every folded patch gets its
    current DC token. Mode ``'residual'``: a folded patch gets its feature from when it was removed
    plus the change of its DC token since then, ``DC_now + (feature_then - DC_then)``; the stored
    residual is zero for HF patches, so they are exact either way.

    Args:
        tokens: (B, M + D, C) the sequence without CLS.
        source: (B, N) position in ``tokens`` that represents each original patch.
        residual: Optional (B, N, C) ``feature_then - DC_then`` per folded patch.

    Returns:
        (B, N, C) one token per original patch, in grid order.
    """
    C = tokens.shape[-1]
    out = tokens.gather(1, source[..., None].expand(-1, -1, C))
    if residual is not None:
        out = out + residual.to(out.dtype)
    return out
