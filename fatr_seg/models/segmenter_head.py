"""``FATRSegmenterHead``: Segmenter's mask transformer on fused attention, and on reduced tokens.

mmseg's ``SegmenterMaskTransformerHead`` runs its attention through ``nn.MultiheadAttention``
with ``need_weights=True``, i.e. an explicit softmax. This subclass keeps its parameters (same
names, same checkpoints) and its arithmetic, but

* runs every attention call on ``F.scaled_dot_product_attention``, so the baseline and FATR heads
  use the same fused kernels as the backbones; and
* accepts :class:`fatr_seg.layers.CompactTokens` from a backbone built with
  ``compact_output=True``: the head then runs on the reduced token set with a ``log(count)`` key
  bias and scatters the per-token class masks onto the grid. With ``restore='copy'`` (the only
  restoration ``compact_output`` accepts) this gives the same logits as the stock head on the
  restored grid (tested), at the cost of the reduced token count instead of the full grid.

Full-grid (B, C, H, W) inputs, e.g. from mmseg's ``VisionTransformer``, work as with the stock
head. The decode is :func:`fatr_seg.layers.mask_head.decode_masks`, shared with the pure-torch
:class:`fatr_seg.layers.MaskTransformerHead`.
"""

from __future__ import annotations

import torch
from mmseg.models.decode_heads import SegmenterMaskTransformerHead
from mmseg.registry import MODELS
from torch.utils.checkpoint import checkpoint

from ..layers.mask_head import decode_masks, encoder_layer

__all__ = ["FATRSegmenterHead"]


@MODELS.register_module()
class FATRSegmenterHead(SegmenterMaskTransformerHead):
    """Segmenter mask transformer head (mmseg's parameters) on fused attention.

    Takes the same arguments as mmseg's ``SegmenterMaskTransformerHead``. Its input is either a
    full-grid map (B, C, H, W) or :class:`~fatr_seg.layers.CompactTokens`; the output is always
    the (B, num_classes, H, W) mask logits.
    """

    def forward(self, inputs) -> torch.Tensor:
        return decode_masks(self, self._transform_inputs(inputs), _checkpointed_layer)


def _checkpointed_layer(layer, z: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # mmseg's with_cp: recompute the layer in the backward instead of storing its activations.
    if getattr(layer, "with_cp", False) and z.requires_grad:
        return checkpoint(encoder_layer, layer, z, bias, use_reentrant=False)
    return encoder_layer(layer, z, bias)
