"""Segmenter's mask transformer decoder on fused attention, in pure torch.

The decode itself (:func:`decode_masks`) is shared: ``fatr_seg.models.FATRSegmenterHead`` runs it
on mmseg's ``SegmenterMaskTransformerHead`` modules, and :class:`MaskTransformerHead` is the same
decoder built from torch modules alone, with mmseg's parameter names, so a Segmenter checkpoint's
``decode_head.*`` weights load into it strictly. It exists for inference where mmcv is not
installed (``tools/gpu_bench.sh`` on a bare GPU machine); training stays with the mmseg head.

Both read either a full-grid map (B, C, H, W) or :class:`CompactTokens` (the reduced token set:
each token then gets the key bias ``log(count)``, which gives exactly the logits of the full grid).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .compact import CompactTokens

__all__ = ["MaskTransformerHead", "decode_masks", "encoder_layer", "fused_mha"]


def fused_mha(mha, x: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
    """Self-attention of an mmcv-style ``MultiheadAttention`` ``mha`` on ``x`` (B, L, C), fused.

    ``mha.attn`` is a ``torch.nn.MultiheadAttention``; its weights are used as they are. Returns
    the projected attention output (before ``mha``'s dropout and residual). ``key_bias`` (B, L)
    is added to every query's logits for that key.
    """
    inner = mha.attn  # torch.nn.MultiheadAttention
    if inner.bias_k is not None or inner.add_zero_attn or not inner._qkv_same_embed_dim:
        raise ValueError("the Segmenter head supports plain self-attention layers only")
    B, L, C = x.shape
    h = inner.num_heads
    qkv = F.linear(x, inner.in_proj_weight, inner.in_proj_bias)
    q, k, v = qkv.view(B, L, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, L, d) each
    mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
    drop = inner.dropout if inner.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
    return inner.out_proj(out.transpose(1, 2).reshape(B, L, C))


def encoder_layer(layer, x: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
    """mmseg ``TransformerEncoderLayer.forward`` with fused, key-biased attention."""
    mha = layer.attn
    x = x + mha.dropout_layer(mha.proj_drop(fused_mha(mha, layer.norm1(x), key_bias)))
    return layer.ffn(layer.norm2(x), identity=x)


def decode_masks(
    head: nn.Module, x: torch.Tensor | CompactTokens, run_layer: Callable | None = None
) -> torch.Tensor:
    """Segmenter's mask decoding: class masks (B, num_classes, H, W) of one backbone level.

    Args:
        head: Holds ``dec_proj``, ``cls_emb``, ``layers``, ``decoder_norm``, ``patch_proj``,
            ``classes_proj``, ``mask_norm`` and ``num_classes`` (mmseg's names).
        x: A full-grid map (B, C, H, W) or :class:`CompactTokens`.
        run_layer: ``run_layer(layer, z, key_bias)`` runs one encoder layer (default
            :func:`encoder_layer`; the mmseg head passes a gradient-checkpointed one).
    """
    run_layer = run_layer or encoder_layer
    if isinstance(x, CompactTokens):
        tokens, bias = x.tokens, x.key_bias()
    else:
        b, c, h, w = x.shape
        tokens, bias = x.flatten(2).transpose(1, 2), None
    B, n, _ = tokens.shape
    z = head.dec_proj(tokens)
    z = torch.cat([z, head.cls_emb.expand(B, -1, -1)], dim=1)
    if bias is not None:
        bias = torch.cat([bias, bias.new_zeros(B, head.num_classes)], dim=1)
    for layer in head.layers:
        z = run_layer(layer, z, bias)
    z = head.decoder_norm(z)

    patches = F.normalize(head.patch_proj(z[:, :n]), dim=2, p=2)
    classes = F.normalize(head.classes_proj(z[:, n:]), dim=2, p=2)
    masks = head.mask_norm(patches @ classes.transpose(1, 2))  # (B, n, num_classes)
    if isinstance(x, CompactTokens):
        logits = x.scatter(masks)
    else:
        logits = masks.transpose(1, 2).reshape(b, head.num_classes, h, w)
    # Contiguous, as mmseg's head makes it: the (B, K, H, W) view of (B, N, K) masks has
    # channels-last strides, and resizing 150 such channels to the image size then took
    # 5-6x as long (2.4 s vs 0.42 s at 512², one thread) as on a contiguous tensor.
    return logits.contiguous()


class _Attention(nn.Module):
    # mmcv's MultiheadAttention wrapper, for inference: the torch module and no dropout.
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, bias=qkv_bias, batch_first=True)
        self.proj_drop = nn.Identity()
        self.dropout_layer = nn.Identity()


class _FFN(nn.Module):
    # mmcv's FFN with two layers (its parameter names): x + fc2(gelu(fc1(x))).
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU()),
                                    nn.Linear(hidden, dim))  # fmt: skip

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        return identity + self.layers(x)


class _EncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, qkv_bias: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)  # mmcv's LN: eps 1e-5
        self.attn = _Attention(dim, num_heads, qkv_bias)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = _FFN(dim, mlp_ratio * dim)

    @property
    def norm1(self) -> nn.LayerNorm:
        return self.ln1

    @property
    def norm2(self) -> nn.LayerNorm:
        return self.ln2


class MaskTransformerHead(nn.Module):
    """Segmenter's mask transformer head for inference, without mmseg or mmcv.

    The parameters and arithmetic of mmseg's ``SegmenterMaskTransformerHead`` (its
    ``state_dict`` loads strictly) in eval mode: no dropout, no stochastic depth.

    Args:
        in_channels: Channels of the backbone output.
        num_classes: Classes.
        num_layers: Transformer layers.
        num_heads: Attention heads.
        embed_dims: Decoder width.
        mlp_ratio: FFN hidden size / ``embed_dims``.
        qkv_bias: Bias on the attention's input projection.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_layers: int = 2,
        num_heads: int = 6,
        embed_dims: int = 384,
        mlp_ratio: int = 4,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.layers = nn.ModuleList(
            _EncoderLayer(embed_dims, num_heads, mlp_ratio, qkv_bias) for _ in range(num_layers)
        )
        self.dec_proj = nn.Linear(in_channels, embed_dims)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, embed_dims) * 0.02)
        self.patch_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        self.classes_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        self.decoder_norm = nn.LayerNorm(embed_dims)
        self.mask_norm = nn.LayerNorm(num_classes)

    def forward(self, inputs) -> torch.Tensor:
        """Mask logits (B, num_classes, H, W) of the last backbone output in ``inputs``."""
        x = inputs[-1] if isinstance(inputs, list | tuple) else inputs
        return decode_masks(self, x)
