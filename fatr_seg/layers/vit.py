"""A plain ViT trunk with frequency-aware token reduction (pure torch + timm layers).

``state_dict`` keys follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.attn.qkv`` ...), so timm checkpoints load strictly. The mmseg backbone
:class:`fatr_seg.models.FATRViT` is this module plus mmseg's registry and weight loading.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops.state import TokenState, init_state
from .attention import hp_coefficients
from .block import Block
from .compact import compact_tokens
from .config import ReductionConfig
from .embed import POS_INTERPOLATE_MODES, PatchEmbed, resample_pos_embed
from .reducer import TokenReducer
from .restorer import TokenRestorer

__all__ = ["FATRVisionTransformer", "ReductionTrace"]


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
            size works: the embedding is interpolated to the actual grid.
        patch_size: Patch size.
        in_channels: Input channels.
        embed_dims: Embedding dim C.
        num_layers: Depth.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden / C.
        qkv_bias: Bias on qkv.
        drop_rate: Dropout after the positional embedding, the attention projection and in the
            MLP.
        drop_path_rate: Stochastic depth, linearly increasing over depth (on both residual
            branches, as timm).
        init_values: LayerScale init (None: no LayerScale).
        norm_eps: Epsilon of every LayerNorm (timm and Segmenter use 1e-6).
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
            (``fatr_seg.models.FATRSegmenterHead``). Needs ``restore='copy'``; with no reduction
            every grid position is its own token.
        attn_drop_rate: Dropout on the attention probabilities in training.
        proj_bias: Bias on each attention's output projection.
        act_layer: The MLP activation, a module class or factory (``nn.GELU``).
        patch_bias: Bias on the patch projection.
        patch_norm: A LayerNorm on the embedded patches (``patch_embed.norm``).
        patch_pad: Padding of the patch embedding: ``'corner'``, ``'same'`` or an int (see
            :class:`PatchEmbed`).
        pre_norm: A LayerNorm on the sequence before the first block (``norm_pre``).
        with_cls_token: Run the blocks with the CLS token. False needs ``reduction=None``: the
            reduction layers keep the CLS token at position 0 of the sequence.
        output_cls_token: Return ``[map, cls_token]`` per output index (the (B, C) CLS token
            after that block; after the final norm for the last block), as mmseg's ViT.
        out_origin: Also return the embedded input (after ``pre_norm``) as the first output.
        interpolate_mode: How the positional embedding is resampled to another grid, one of
            :data:`POS_INTERPOLATE_MODES`.
        with_cp: Gradient checkpointing per block in training: activations are recomputed in
            the backward pass instead of stored.
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
        attn_drop_rate: float = 0.0,
        proj_bias: bool = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        patch_bias: bool = True,
        patch_norm: bool = False,
        patch_pad: str | int = "corner",
        pre_norm: bool = False,
        with_cls_token: bool = True,
        output_cls_token: bool = False,
        out_origin: bool = False,
        interpolate_mode: str = "bicubic",
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.check_finite = check_finite
        self.compact_output = compact_output
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(img_size) == 1:
            img_size = img_size * 2
        if len(img_size) != 2 or img_size[0] < patch_size or img_size[1] < patch_size:
            raise ValueError(f"img_size={img_size} is smaller than patch_size={patch_size}")
        for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                           ("drop_path_rate", drop_path_rate)):  # fmt: skip
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name}={rate} is invalid: a probability in [0, 1)")
        if interpolate_mode not in POS_INTERPOLATE_MODES:
            raise ValueError(
                f"interpolate_mode={interpolate_mode!r} is invalid: choose one of "
                f"{POS_INTERPOLATE_MODES}"
            )
        self.patch_size = patch_size
        self.embed_dims = embed_dims
        self.num_layers = num_layers
        self.pos_grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.interpolate_mode = interpolate_mode
        self.with_cp = with_cp
        out_indices = (out_indices,) if isinstance(out_indices, int) else tuple(out_indices)
        if any(not -num_layers <= i < num_layers for i in out_indices):
            raise ValueError(f"out_indices={out_indices} out of range for {num_layers} layers")
        self.out_indices = tuple(sorted({i % num_layers for i in out_indices}))
        self.out_origin = out_origin
        if not (self.out_indices or out_origin):
            raise ValueError("out_indices=() returns nothing: give a block (or out_origin=True)")
        self.reduction = ReductionConfig.from_dict(reduction, depth=num_layers)
        if self.reduction is not None:
            self.reduction.check_grid(self.pos_grid)
        if compact_output and self.reduction and self.reduction.restore != "copy":
            raise ValueError(
                f"compact_output=True needs reduction restore='copy' (got "
                f"{self.reduction.restore!r}): with 'residual' every aggregated patch has its "
                "own feature, so the grid cannot be represented by the reduced tokens"
            )
        if not with_cls_token and self.reduction is not None:
            raise ValueError(
                "with_cls_token=False is supported only with reduction=None: the reduction "
                "layers keep the CLS token at position 0 of the sequence (EViT's score reads its "
                "attention)"
            )
        if output_cls_token and not with_cls_token:
            raise ValueError("output_cls_token=True needs with_cls_token=True")
        if output_cls_token and compact_output:
            raise ValueError(
                "output_cls_token=True needs compact_output=False: FATRSegmenterHead, the one "
                "reader of compact output, takes no CLS token"
            )
        self.with_cls_token = with_cls_token
        self.output_cls_token = output_cls_token
        self.final_norm = final_norm

        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dims, patch_bias,
                                      norm_eps if patch_norm else None, patch_pad)  # fmt: skip
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.pos_grid), embed_dims))
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = nn.LayerNorm(embed_dims, eps=norm_eps) if pre_norm else nn.Identity()
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
                          fused_attn=fused_attn, attn_drop=attn_drop_rate, proj_bias=proj_bias,
                          act_layer=act_layer, norm_eps=norm_eps)  # fmt: skip
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
        """Positional embedding for a (H, W) patch grid, (1, 1 + H·W, C)."""
        return resample_pos_embed(self.pos_embed, self.pos_grid, hw_shape, self.interpolate_mode)

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
        """Patch-embed ``x`` (B, 3, H, W), prepend CLS: (B, 1 + N, C) and the initial state.

        Without ``with_cls_token`` the sequence is (B, N, C): the patches alone.
        """
        self.check_input(x)
        tokens, hw = self.patch_embed(x)
        pos = self.interpolate_pos_embed(hw)
        if self.with_cls_token:
            cls = self.cls_token.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([cls, tokens], dim=1) + pos
        else:
            tokens = tokens + pos[:, 1:]
        tokens = self.norm_pre(self.pos_drop(tokens))
        return tokens, init_state(tokens.shape[0], hw, tokens.device)

    def forward_tokens(
        self, x: torch.Tensor, out_indices: tuple[int, ...] | None = None,
        traces: list | None = None, origin: bool = False,
    ) -> list[tuple[torch.Tensor, TokenState]]:  # fmt: skip
        """Run the blocks; return ``(tokens, state)`` after each block in ``out_indices``.

        The final norm is NOT applied here (see :meth:`forward`). If ``traces`` is a list, one
        :class:`ReductionTrace` per reduction layer is appended to it. ``origin`` puts the
        embedded input first.
        """
        out_indices = self.out_indices if out_indices is None else out_indices
        last = max(out_indices, default=-1)
        x, state = self.embed(x)
        outs = [(x, state)] if origin else []
        coefs = hp_coefficients([blk.attn for blk in self.blocks])
        for i, blk in enumerate(self.blocks):
            if i > last and traces is None:
                break
            if self.with_cp and x.requires_grad and torch.is_grad_enabled():
                x, state, rec = checkpoint(blk, x, state, coefs[i], use_reentrant=False)
            else:
                x, state, rec = blk(x, state, coefs[i])
            if rec is not None and traces is not None:
                trace = ReductionTrace(
                    i + 1, state.hw_shape, rec.kept, rec.kept_scores, aggregated_into(state),
                    state.source,
                )  # fmt: skip
                traces.append(trace)
            if i in out_indices:
                outs.append((x, state))
        return outs

    def forward(self, x: torch.Tensor) -> tuple:
        """Full-grid feature maps, one (B, C, H/p, W/p) per index in ``out_indices``.

        Shapes match mmseg's ``VisionTransformer`` (CLS dropped, final norm on the last block),
        so every stock mmseg decode head works unchanged. With ``compact_output`` one
        :class:`CompactTokens` per index instead (``.restore()`` gives the same map); with
        ``output_cls_token`` a list ``[map, cls_token]`` per index; with ``out_origin`` the
        embedded input comes first.
        """
        indices = ((-1,) if self.out_origin else ()) + self.out_indices
        pairs = self.forward_tokens(x, origin=self.out_origin)
        return tuple(self.output(tokens, state, i) for (tokens, state), i in
                     zip(pairs, indices, strict=True))  # fmt: skip

    def output(self, tokens: torch.Tensor, state: TokenState, index: int):
        """The output of block ``index`` (-1: the embedded input) from its sequence and state."""
        norm = self.final_norm_module() if index == self.num_layers - 1 else None
        prefix = self.num_prefix_tokens
        if self.compact_output:
            # The final norm is per token, so it commutes with the restoring gather.
            return compact_tokens(tokens if norm is None else norm(tokens), state, prefix)
        out = self.restorer(tokens, state, norm, prefix)
        if self.output_cls_token:
            cls = tokens[:, 0]
            return [out, cls if norm is None else norm(cls)]
        return out

    @property
    def num_prefix_tokens(self) -> int:
        """P, the tokens before the patches in the sequence: the CLS token (1) or none (0)."""
        return int(self.with_cls_token)

    def final_norm_module(self) -> nn.Module | None:
        """The norm applied to the last block's output, or None."""
        return self.norm if self.final_norm else None

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
