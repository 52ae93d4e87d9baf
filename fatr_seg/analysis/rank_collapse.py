"""Per-layer rank-collapse diagnostics on (possibly reduced) token sequences; pure torch.

The paper's figures 1 and 4: the relative high-frequency amplitude ``‖X − mean(X)‖ / ‖X‖`` of
each block's tokens, measured on the **restored grid** (one token per patch through the source
map, as a decode head would read it: every method on the same N positions) and on the **token
set** actually present; and each layer's cosine similarity to the last layer's.
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
