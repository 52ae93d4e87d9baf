"""Kernel-launching ATen ops of an eager forward, counted on CPU with a dispatch mode.

Issue 24's measure of what token reduction costs a GPU beyond its FLOPs: every ATen op that
reaches the dispatcher in one eager inference forward, less those that launch no kernel (views,
``detach``, ``alias``, ``_unsafe_view`` and ``promote_types``, the type-promotion query).
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FREE_OPS = {
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.promote_types.default,
}


def launches_kernel(func) -> bool:
    """Whether an ATen overload is counted: views, detach and type promotion are not."""
    return not (func.is_view or func in FREE_OPS)


class CountOps(TorchDispatchMode):
    """Counts the kernel-launching ATen ops dispatched while it is active, per overload."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(fn) -> CountOps:
    with CountOps() as counter:
        fn()
    return counter


def vit_ops(reduction, size: int = 256, batch: int = 1, omega1: float = 0.0,
            **kwargs) -> CountOps:  # fmt: skip
    """Ops of one eager inference forward of a 12-block ViT-Ti/16 (random weights; ``omega1``
    everywhere: 0, its init, makes the high-pass reweighting the identity, which is skipped)."""
    from fatr_seg.layers import FATRVisionTransformer

    torch.manual_seed(0)
    model = FATRVisionTransformer(img_size=size, patch_size=16, embed_dims=192, num_layers=12,
                                  num_heads=3, reduction=reduction, **kwargs).eval()  # fmt: skip
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("omega1"):
                p.fill_(omega1)
        model.eval()  # reads omega1 again, as after loading weights
        model(x)  # warm-up: lazy initialisation is not counted
        return count_ops(lambda: model(x))


def ops_per_reduction_layer(reduction: dict, size: int = 256, **kwargs) -> float:
    """(ops with the reduction - ops without) / reduction layers: issue 24's number."""
    from fatr_seg.layers import ReductionConfig

    layers = len(ReductionConfig.from_dict(reduction).layers)
    extra = vit_ops(reduction, size, **kwargs).total - vit_ops(None, size, **kwargs).total
    return extra / layers


def by_op(reduction: dict, size: int = 256) -> dict[str, float]:
    """Extra ops per reduction layer, per ATen overload (most first)."""
    from fatr_seg.layers import ReductionConfig

    layers = len(ReductionConfig.from_dict(reduction).layers)
    extra = vit_ops(reduction, size).ops
    extra.subtract(vit_ops(None, size).ops)
    return {op: round(n / layers, 2) for op, n in extra.most_common() if n}


if __name__ == "__main__":  # python tests/op_count.py: the counts of results/op_counts.json
    import json

    from fatr_seg.layers import PRESETS

    rows = {m: {s: round(ops_per_reduction_layer(dict(method=m), s), 2) for s in (256, 512)}
            for m in sorted(PRESETS)}  # fmt: skip
    trained = {m: {s: round(ops_per_reduction_layer(dict(method=m), s, omega1=0.1), 2)
                   for s in (256, 512)} for m in ("fatr", "fatr_local")}  # fmt: skip
    print(json.dumps(dict(per_layer=rows, per_layer_trained_omega1=trained,
                          default_by_op=by_op(dict(method="fatr_local"))), indent=1))  # fmt: skip
