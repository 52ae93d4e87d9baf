"""Per-layer rank-collapse diagnostics on (possibly reduced) token sequences; pure torch.

The paper (figures 1 and 4) tracks how fast a ViT's tokens collapse toward their mean: the
relative amplitude of the high-frequency part ``‖H_f[X]‖_F / ‖X‖_F`` with
``H_f[X] = X − mean_tokens(X)``, and the cosine similarity of each layer's tokens to the last
layer's. Reduced sequences are measured two ways:

* **restored grid** (the number the CamVid study reports): the sequence restored to one token per
  original patch through the source map (:func:`fatr_seg.ops.restore_tokens`), i.e. what a decode
  head would see if it read that layer. A DC (or merged) token is counted once per patch it
  stands for, so every method is measured on the same N positions;
* **token set**: the patch and DC tokens actually present in the sequence (CLS excluded), each
  counted once.

Nothing here imports mmseg, mmengine or mmcv.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..ops.restore import restore_tokens

__all__ = ["LayerDiagnostics", "cosine_to_last", "diagnostics", "hf_amplitude",
           "layer_diagnostics", "restored_layer_tokens"]  # fmt: skip


def hf_amplitude(x: torch.Tensor) -> torch.Tensor:
    """(B,) relative high-frequency amplitude ``‖X − mean_tokens(X)‖_F / ‖X‖_F`` of tokens
    (B, n, C) without CLS, in [0, 1]; 0 when all tokens are equal (full rank collapse)."""
    if x.dim() != 3:
        raise ValueError(f"expected tokens (B, n, C), got shape {tuple(x.shape)}")
    x = x.float()
    hf = x - x.mean(dim=1, keepdim=True)
    return hf.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)


def cosine_to_last(grids: list[torch.Tensor]) -> torch.Tensor:
    """(L, B) mean cosine similarity of each layer's tokens (L tensors (B, N, C) of the same
    grid positions) to the last layer's, position by position; the last row is 1."""
    last = grids[-1].float()
    return torch.stack([F.cosine_similarity(g.float(), last, dim=-1).mean(dim=1) for g in grids])


def restored_layer_tokens(
    model: torch.nn.Module, x: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One ``(restored (B, N, C), token_set (B, M + D, C))`` per block of a
    :class:`~fatr_seg.layers.FATRVisionTransformer` (``forward_tokens``: no final norm) on
    images ``x``: its output restored to the full grid, and the actual token set."""
    outs = model.forward_tokens(x, out_indices=tuple(range(model.num_layers)))
    layers = []
    for tokens, state in outs:
        seq = tokens[:, 1:]
        layers.append((restore_tokens(seq, state.source, state.residual), seq))
    return layers


class LayerDiagnostics(NamedTuple):
    """Per-layer (L,) means over a batch: ``‖H_f[X]‖ / ‖X‖`` on the restored grid
    (``hf_restored``) and on the token set (``hf_tokens``), cosine similarity to the last
    layer's restored tokens, and the patch + DC tokens present after each block."""

    hf_restored: torch.Tensor
    hf_tokens: torch.Tensor
    cos_to_last: torch.Tensor
    num_tokens: torch.Tensor


@torch.no_grad()
def layer_diagnostics(model: torch.nn.Module, x: torch.Tensor) -> LayerDiagnostics:
    """Rank-collapse diagnostics of every block of ``model`` on images ``x`` (B, 3, H, W)."""
    layers = restored_layer_tokens(model, x)
    grids = [g for g, _ in layers]
    return LayerDiagnostics(
        hf_restored=torch.stack([hf_amplitude(g).mean() for g in grids]),
        hf_tokens=torch.stack([hf_amplitude(t).mean() for _, t in layers]),
        cos_to_last=cosine_to_last(grids).mean(dim=1),
        num_tokens=torch.tensor([float(t.shape[1]) for _, t in layers]),
    )


def diagnostics(model: torch.nn.Module, x: torch.Tensor) -> dict[str, list[float]]:
    """:func:`layer_diagnostics` of ``model``'s backbone on images ``x``, as JSON-ready lists."""
    d = layer_diagnostics(model.backbone, x)
    return {k: v.tolist() for k, v in d._asdict().items()}
