"""``FATRSegmenterHead``: Segmenter's mask transformer on fused attention, and on reduced tokens.

mmseg's ``SegmenterMaskTransformerHead`` runs its attention through ``nn.MultiheadAttention``
with ``need_weights=True``, i.e. an explicit softmax. This subclass keeps its parameters (same
names, same checkpoints) and its arithmetic, but

* runs every attention call on ``F.scaled_dot_product_attention``, so the baseline and FATR heads
  use the same fused kernels as the backbones; and
* accepts :class:`fatr_seg.layers.CompactTokens` from a backbone built with
  ``compact_output=True``: the head then runs on the reduced token set (HF + DC tokens) with a
  ``log(count)`` key bias and scatters the per-token class masks onto the grid. With
  ``restore='dc'`` this gives the same logits as the stock head on the restored grid (tested),
  at the cost of the reduced token count instead of the full grid.

Full-grid (B, C, H, W) inputs, e.g. from mmseg's ``VisionTransformer``, work as with the stock
head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mmseg.models.decode_heads import SegmenterMaskTransformerHead
from mmseg.registry import MODELS
from torch.utils.checkpoint import checkpoint

from ..layers.compact import CompactTokens

__all__ = ["FATRSegmenterHead"]


def fused_mha(mha, x: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
    """Self-attention of mmcv's ``MultiheadAttention`` ``mha`` on ``x`` (B, L, C), fused.

    Returns the projected attention output (before ``mha``'s dropout and residual).
    ``key_bias`` (B, L) is added to every query's logits for that key.
    """
    inner = mha.attn  # torch.nn.MultiheadAttention
    if inner.bias_k is not None or inner.add_zero_attn or not inner._qkv_same_embed_dim:
        raise ValueError("FATRSegmenterHead supports plain self-attention layers only")
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


@MODELS.register_module()
class FATRSegmenterHead(SegmenterMaskTransformerHead):
    """Segmenter mask transformer head (mmseg's parameters) on fused attention.

    Takes the same arguments as mmseg's ``SegmenterMaskTransformerHead``. Its input is either a
    full-grid map (B, C, H, W) or :class:`~fatr_seg.layers.CompactTokens`; the output is always
    the (B, num_classes, H, W) mask logits.
    """

    def forward(self, inputs) -> torch.Tensor:
        x = self._transform_inputs(inputs)
        if isinstance(x, CompactTokens):
            tokens, bias = x.tokens, x.key_bias()
        else:
            b, c, h, w = x.shape
            tokens, bias = x.flatten(2).transpose(1, 2), None
        B, n, _ = tokens.shape
        z = self.dec_proj(tokens)
        z = torch.cat([z, self.cls_emb.expand(B, -1, -1)], dim=1)
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(B, self.num_classes)], dim=1)
        for layer in self.layers:
            if getattr(layer, "with_cp", False) and z.requires_grad:
                z = checkpoint(encoder_layer, layer, z, bias, use_reentrant=False)
            else:
                z = encoder_layer(layer, z, bias)
        z = self.decoder_norm(z)

        patches = F.normalize(self.patch_proj(z[:, :n]), dim=2, p=2)
        classes = F.normalize(self.classes_proj(z[:, n:]), dim=2, p=2)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, n, num_classes)
        if isinstance(x, CompactTokens):
            logits = x.scatter(masks)
        else:
            logits = masks.transpose(1, 2).reshape(b, self.num_classes, h, w)
        # Contiguous, as mmseg's head makes it: the (B, K, H, W) view of (B, N, K) masks has
        # channels-last strides, and resizing 150 such channels to the image size then took
        # 5-6x as long (2.4 s vs 0.42 s at 512², one thread) as on a contiguous tensor.
        return logits.contiguous()
