"""Patch embedding and positional-embedding resampling of the ViT trunk (pure torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["POS_INTERPOLATE_MODES", "PatchEmbed", "resample_pos_embed"]

#: Modes :func:`resample_pos_embed` accepts (``F.interpolate``'s modes for 2-D grids).
POS_INTERPOLATE_MODES = ("bicubic", "bilinear", "nearest", "nearest-exact", "area")


def resample_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resample the grid part of a (1, 1 + h·w, C) positional embedding to ``new_grid``.

    The CLS position is kept as is; the grid is interpolated with ``mode`` (corners not aligned,
    as mmseg and timm).
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    corners = False if mode in ("bilinear", "bicubic") else None
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=corners)
    return torch.cat([cls_pos, grid.flatten(2).transpose(1, 2)], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding (timm's names ``proj`` and ``norm``).

    Args:
        patch_size: Patch size p.
        in_chans: Input channels.
        embed_dim: Embedding dim C.
        bias: Bias on the projection.
        norm_eps: LayerNorm epsilon of a norm on the embedded patches; None: no norm.
        padding: ``'corner'`` pads bottom/right to a multiple of p, ``'same'`` pads both sides
            evenly (the extra pixel at the bottom/right), an int is the convolution's own
            zero padding (an incomplete last patch is then dropped), as mmseg's ``patch_pad``.

    Returns tokens (B, H·W, C) and the grid (H, W).
    """

    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        norm_eps: float | None = None,
        padding: str | int = "corner",
    ) -> None:
        super().__init__()
        valid = padding in ("corner", "same") or (
            isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0
        )
        if not valid:
            raise ValueError(
                f"patch_pad={padding!r} is invalid: 'corner', 'same' or a non-negative int"
            )
        self.patch_size = patch_size
        self.padding = padding
        conv_pad = padding if isinstance(padding, int) else 0
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, conv_pad, bias=bias)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if norm_eps else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        pad_h, pad_w = (-x.shape[2]) % p, (-x.shape[3]) % p
        if self.padding == "corner" and (pad_h or pad_w):
            x = F.pad(x, (0, pad_w, 0, pad_h))
        elif self.padding == "same" and (pad_h or pad_w):
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        x = self.proj(x)  # (B, C, H, W)
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])
