"""The self-distillation losses of :class:`fatr_seg.models.DistillEncoderDecoder` (pure torch).

Both are computed at the resolution of the tensors they compare (the decode head's output grid
for the logits, the patch grid for backbone features) and averaged over *valid* positions: each
position counts with the fraction of its pixels whose label is not ``ignore_index``
(:func:`valid_weights`). When the label map is an integer multiple of that grid, this is exactly
the per-pixel loss on the label grid with every position's value copied to its pixels (nearest
upsampling), averaged over the labelled pixels; padding and void pixels do not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FEATURE_LOSSES", "feature_distill_loss", "kl_distill_loss", "valid_weights"]

FEATURE_LOSSES = ("mse", "cosine")


def valid_weights(gt: torch.Tensor, size: tuple[int, int], ignore_index: int) -> torch.Tensor:
    """Fraction of labelled pixels under each position of a ``size`` grid.

    Args:
        gt: (B, 1, H, W) or (B, H, W) integer labels.
        size: The grid (h, w) the loss is computed on.
        ignore_index: The label of pixels that do not count.

    Returns:
        (B, h, w) float32 weights in [0, 1] (adaptive average pooling of the valid mask).
    """
    valid = (gt != ignore_index).float()
    if valid.dim() == 3:
        valid = valid[:, None]
    return F.adaptive_avg_pool2d(valid, tuple(size))[:, 0]


def _weighted_mean(per_position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # No host sync: with nothing labelled in the batch both sums are 0 and the loss is a 0 that
    # keeps the graph (every parameter still gets a gradient, as DDP requires).
    total = weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
    return (per_position * weights).sum() / total


def kl_distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` per position, weighted mean.

    Args:
        student: (B, K, h, w) logits; the gradient flows into them.
        teacher: (B, K, h, w) logits (detached by the caller).
        weights: (B, h, w) position weights (:func:`valid_weights`).
        temperature: T > 0; ``T²`` keeps the gradient's scale independent of T (Hinton et al.).

    Returns:
        A scalar; computed in float32 at least, whatever the logits' dtype.
    """
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_s = F.log_softmax(student.to(dtype) / temperature, dim=1)
    log_t = F.log_softmax(teacher.to(dtype) / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)  # (B, h, w)
    return temperature**2 * _weighted_mean(kl, weights.to(dtype))


def feature_distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """Distance between (B, C, h, w) feature maps per position, weighted mean.

    Args:
        student: Student features; the gradient flows into them.
        teacher: Teacher features (detached by the caller).
        weights: (B, h, w) position weights.
        kind: ``'mse'`` (mean over channels of the squared difference) or ``'cosine'``
            (1 - cosine similarity over channels).
    """
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"feat_distill_type={kind!r} is invalid: use one of {FEATURE_LOSSES}")
    dtype = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(dtype), teacher.to(dtype)
    if kind == "mse":
        per_position = (s - t).pow(2).mean(dim=1)
    else:
        per_position = 1.0 - F.cosine_similarity(s, t, dim=1)
    return _weighted_mean(per_position, weights.to(dtype))
