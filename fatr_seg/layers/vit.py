"""A plain ViT trunk with frequency-aware token reduction (pure torch + timm layers).

``state_dict`` keys follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.attn.qkv`` ...), so timm checkpoints load strictly. The mmseg backbone
:class:`fatr_seg.models.FATRViT` is this module plus mmseg's registry and weight loading.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.state import TokenState, init_state
from .block import Block
from .compact import CompactTokens, compact_tokens
from .config import ReductionConfig
from .reducer import TokenReducer
from .restorer import TokenRestorer

__all__ = ["FATRVisionTransformer", "PatchEmbed", "ReductionTrace"]


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding; pads bottom/right to a multiple of the patch (as mmseg).

    Returns tokens (B, H·W, C) and the grid (H, W).
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        pad_h, pad_w = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)  # (B, C, H, W)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class ReductionTrace(NamedTuple):
    """What one reduction layer did, for analysis and visualisation.

    Attributes:
        layer: 1-indexed block.
        hw_shape: Patch grid (H, W).
        kept: (B, K) original-grid indices of the patch tokens kept by this layer (-1: a token
            with no cell, such as EViT's fused token).
        kept_scores: (B, K) their scores.
        group: (B, N) for every patch that no longer is a token of its own, the position (in the
            sequence without CLS) of the token it was aggregated into: a DC token, a kept token
            it merged into, a fused token; -1 for a patch that is its token's own cell.
        source: (B, N) source map after this layer (position in the sequence without CLS).
    """

    layer: int
    hw_shape: tuple[int, int]
    kept: torch.Tensor
    kept_scores: torch.Tensor
    group: torch.Tensor
    source: torch.Tensor


_NONFINITE = (
    "input images contain NaN or Inf; check the data pipeline's normalisation "
    "(or build the backbone with check_finite=False to pass them through)"
)


def aggregated_into(state: TokenState) -> torch.Tensor:
    """(B, N): the token each aggregated patch is represented by, -1 for a token's own cell."""
    B, N = state.source.shape
    dc_cells = state.patch_idx.new_full((B, state.num_dc), -1)
    cells = torch.cat([state.patch_idx, dc_cells], dim=1)  # grid cell of every token
    own = cells.gather(1, state.source) == torch.arange(N, device=state.source.device)
    return torch.where(own, -1, state.source)


class FATRVisionTransformer(nn.Module):
    """Plain ViT that reduces tokens inside chosen blocks and restores full-grid feature maps.

    Args:
        img_size: Pretraining image size; sets the stored positional-embedding grid. Any input
            size works: the embedding is interpolated (bicubic) to the actual grid.
        patch_size: Patch size.
        in_channels: Input channels.
        embed_dims: Embedding dim C.
        num_layers: Depth.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden / C.
        qkv_bias: Bias on qkv.
        drop_rate: Dropout after patch embedding, projections and MLP.
        drop_path_rate: Stochastic depth, linearly increasing over depth.
        init_values: LayerScale init (None: no LayerScale).
        norm_eps: LayerNorm epsilon (timm and Segmenter use 1e-6).
        final_norm: Apply the final LayerNorm to the last block's output.
        out_indices: 0-indexed blocks whose outputs are returned as NCHW maps.
        reduction: Reduction config dict (see :class:`ReductionConfig`) or None for a plain ViT.
        fused_attn: Use fused attention (None reads ``FATR_FUSED_ATTN``).
        check_finite: Reject inputs holding NaN or Inf at the entry (one reduction over the
            input, checked asynchronously: a ``ValueError`` on CPU, a device-side assert on
            CUDA; no host synchronisation either way). NaN would otherwise reach the token
            ranking, where it silently scrambles the selection.
        compact_output: Return :class:`CompactTokens` (the reduced token set and its source
            map) instead of full-grid maps, for a decoder that runs on the reduced set
            (``fatr_seg.models.FATRSegmenterHead``). Needs ``restore='dc'``; with no reduction
            every grid position is its own token.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dims: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        norm_eps: float = 1e-6,
        final_norm: bool = True,
        out_indices: int | tuple[int, ...] = -1,
        reduction: dict | None = None,
        fused_attn: bool | None = None,
        check_finite: bool = True,
        compact_output: bool = False,
    ) -> None:
        super().__init__()
        self.check_finite = check_finite
        self.compact_output = compact_output
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] < patch_size or img_size[1] < patch_size:
            raise ValueError(f"img_size={img_size} is smaller than patch_size={patch_size}")
        self.patch_size = patch_size
        self.embed_dims = embed_dims
        self.num_layers = num_layers
        self.pos_grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        out_indices = (out_indices,) if isinstance(out_indices, int) else tuple(out_indices)
        self.out_indices = tuple(sorted({i % num_layers for i in out_indices}))
        if any(not -num_layers <= i < num_layers for i in out_indices):
            raise ValueError(f"out_indices={out_indices} out of range for {num_layers} layers")
        self.reduction = ReductionConfig.from_dict(reduction, depth=num_layers)
        if compact_output and self.reduction and self.reduction.restore != "copy":
            raise ValueError(
                f"compact_output=True needs reduction restore='copy' (got "
                f"{self.reduction.restore!r}): with 'residual' every aggregated patch has its "
                "own feature, so the grid cannot be represented by the reduced tokens"
            )
        self.final_norm = final_norm

        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dims)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.pos_grid), embed_dims))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, num_layers).tolist()
        red = self.reduction
        first = red.layers[0] - 1 if red else num_layers
        dc_terms = bool(red) and "dc" in red.aggregate
        blocks = []
        for i in range(num_layers):
            j = red.index(i) if red else None
            reducer = None if j is None else TokenReducer(red, j, embed_dims)
            reweight = red.reweight if (red and i > first) else None
            block = Block(embed_dims, num_heads, mlp_ratio, qkv_bias, drop_rate, dpr[i],
                          init_values, reweight=reweight, reducer=reducer, dc_terms=dc_terms,
                          fused_attn=fused_attn)  # fmt: skip
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps) if final_norm else nn.Identity()
        self.restorer = TokenRestorer(red.restore if red else "copy")
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, hw_shape: tuple[int, int]) -> torch.Tensor:
        """Positional embedding for a (H, W) patch grid, (1, 1 + H·W, C); bicubic like mmseg."""
        if tuple(hw_shape) == self.pos_grid:
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_pos = grid_pos.reshape(1, *self.pos_grid, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=hw_shape, mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid_pos.flatten(2).transpose(1, 2)], dim=1)

    def check_input(self, x: torch.Tensor) -> None:
        """Reject inputs the model cannot process, naming the problem."""
        if x.dim() != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(
                f"expected {self.patch_embed.proj.in_channels} input channels, got {x.shape[1]}"
            )
        if x.shape[2] < self.patch_size or x.shape[3] < self.patch_size:
            raise ValueError(
                f"image {x.shape[2]}x{x.shape[3]} is smaller than one {self.patch_size}-pixel patch"
            )
        if self.check_finite:
            try:
                # Asynchronous: no host read. CPU raises right here; CUDA asserts on the device.
                torch._assert_async(torch.isfinite(x).all(), _NONFINITE)
            except RuntimeError as err:
                if _NONFINITE not in str(err):
                    raise
                raise ValueError(_NONFINITE) from None

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenState]:
        """Patch-embed ``x`` (B, 3, H, W) and prepend CLS: (B, 1 + N, C) and the initial state."""
        self.check_input(x)
        tokens, hw = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.interpolate_pos_embed(hw)
        return self.pos_drop(tokens), init_state(tokens.shape[0], hw, tokens.device)

    def forward_tokens(
        self, x: torch.Tensor, out_indices: tuple[int, ...] | None = None,
        traces: list | None = None,
    ) -> list[tuple[torch.Tensor, TokenState]]:  # fmt: skip
        """Run the blocks; return ``(tokens, state)`` after each block in ``out_indices``.

        The final norm is NOT applied here (see :meth:`forward`). If ``traces`` is a list, one
        :class:`ReductionTrace` per reduction layer is appended to it.
        """
        out_indices = self.out_indices if out_indices is None else out_indices
        x, state = self.embed(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            x, state, rec = blk(x, state)
            if rec is not None and traces is not None:
                trace = ReductionTrace(
                    i + 1, state.hw_shape, rec.kept, rec.kept_scores, aggregated_into(state),
                    state.source,
                )  # fmt: skip
                traces.append(trace)
            if i in out_indices:
                outs.append((x, state))
            if i == max(out_indices) and traces is None:
                break
        return outs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | tuple[CompactTokens, ...]:
        """Full-grid feature maps, one (B, C, H/p, W/p) per index in ``out_indices``.

        Shapes match mmseg's ``VisionTransformer`` (CLS dropped, final norm on the last block),
        so every stock mmseg decode head works unchanged. With ``compact_output`` one
        :class:`CompactTokens` per index instead (``.restore()`` gives the same map).
        """
        outs = []
        for (tokens, state), i in zip(self.forward_tokens(x), self.out_indices, strict=True):
            norm = self.norm if (i == self.num_layers - 1 and self.final_norm) else None
            if self.compact_output:
                # The final norm is per token, so it commutes with the restoring gather.
                outs.append(compact_tokens(tokens if norm is None else norm(tokens), state))
            else:
                outs.append(self.restorer(tokens, state, norm))
        return tuple(outs)

    def set_keep_ratio(self, keep_ratio: float | tuple[float, ...]) -> None:
        """Change the reduction budget in place: no rebuild, no new parameters, no reload.

        Every reducer reads its budget from the model's :class:`ReductionConfig` at forward
        time, so after this call the model computes exactly what a model built with this
        ``keep_ratio`` (and the same weights) computes. Outputs keep their full-grid shapes.

        Args:
            keep_ratio: One ratio in (0, 1] for every reduction layer, or one per layer. It
                replaces a token-count budget (``r``) too.

        Raises:
            ValueError: A ratio outside (0, 1], a tuple of the wrong length, a non-number, or a
                model without reduction; the message names ``keep_ratio`` and what is allowed.
        """
        if self.reduction is None:
            raise ValueError("set_keep_ratio: this model has no reduction (reduction=None)")
        self.reduction = self.reduction.with_keep_ratio(keep_ratio)
        for blk in self.blocks:
            if blk.reducer is not None:
                blk.reducer.cfg = self.reduction

    @torch.no_grad()
    def reduction_trace(self, x: torch.Tensor) -> list[ReductionTrace]:
        """Analysis API: per reduction layer, which patches stayed HF and where the rest went.

        Args:
            x: Images (B, 3, H, W), normalised as for :meth:`forward`.

        Returns:
            One :class:`ReductionTrace` per reduction layer (empty for a plain ViT).
        """
        traces: list[ReductionTrace] = []
        self.forward_tokens(x, out_indices=(self.num_layers - 1,), traces=traces)
        return traces
