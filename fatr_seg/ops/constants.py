"""Small constant tensors a reduction would otherwise rebuild (a kernel each) on every call."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

__all__ = ["cached_constant"]

_CACHE: dict[tuple[Hashable, torch.device], torch.Tensor] = {}


def cached_constant(key: Hashable, device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()`` once per ``key`` and device; treat the result as read-only.

    Not cached while compiling (the graph builds the constant) or while a CUDA graph captures
    (its kernels run only at replay, so the tensor would hold nothing outside the graph).
    """
    if torch.compiler.is_compiling():  # first: dynamo does not trace the capture query
        return build()
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return build()
    value = _CACHE.get((key, device))
    if value is None:
        value = _CACHE[(key, device)] = build()
    return value
