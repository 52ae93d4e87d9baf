"""Float32 products that stay float32 under ``torch.autocast``.

Token scores, similarities and the ``A[:, DC]`` logits are meant in float32 (their callers cast
to float first), but autocast runs every ``matmul`` in its low-precision dtype whatever the
inputs' dtype: bf16's 8-bit mantissa then flips near-tied token selections and breaks the
float32 buffers the scores are written into. :func:`float32_matmul` turns autocast off for the
one product.
"""

from __future__ import annotations

import torch

__all__ = ["AUTOCAST_DEVICES", "float32_matmul"]

# Device types with an autocast mode; others (``meta``) have none to turn off.
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def float32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a.float() @ b.float()``, in float32 also inside ``torch.autocast`` (float64 stays)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    device = a.device.type
    if device not in AUTOCAST_DEVICES:
        return torch.matmul(a.to(dtype), b.to(dtype))
    # A plain `with` on the autocast mode: dynamo (fullgraph) cannot trace a context manager
    # chosen at run time.
    with torch.autocast(device, enabled=False):
        return torch.matmul(a.to(dtype), b.to(dtype))
