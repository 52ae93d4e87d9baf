"""Token budgets at equal MACs: the keep ratio (or ToMe's ``r``) that gives a reference's MACs.

Reducers at one ``keep_ratio`` do not cost the same (FATR's exact HF score, EViT's fused token,
DC tokens, ToMe's per-block schedule): :func:`match_budget` bisects a method's budget until its
closed-form backbone MACs (:func:`.flops.analytic_vit_macs`) match. Pure torch: no mmseg.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..layers.config import ReductionConfig
from .flops import analytic_vit_macs

__all__ = ["MatchedBudget", "ViTShape", "bisect_budget", "match_budget", "with_budget"]


@dataclass(frozen=True)
class ViTShape:
    """What :func:`analytic_vit_macs` needs of a ViT and its input: the patch grid (H, W) of
    the input padded to whole patches, embedding dim, blocks, patch size, heads (the head dim
    of key similarities) and MLP ratio."""

    grid: tuple[int, int]
    dim: int
    depth: int
    patch_size: int
    num_heads: int
    mlp_ratio: float = 4.0

    def macs(self, reduction: dict | None) -> int:
        """Backbone MACs of one image with ``reduction`` (scores and DC terms included)."""
        return analytic_vit_macs(self.grid, self.dim, self.depth, self.patch_size,
                                 mlp_ratio=self.mlp_ratio, reduction=reduction,
                                 num_heads=self.num_heads)  # fmt: skip


@dataclass(frozen=True)
class MatchedBudget:
    """A method's ``reduction`` with the budget found (``key``: ``'keep_ratio'`` or ``'r'``,
    ``value``), its backbone ``macs`` and the reference's (``target``)."""

    reduction: dict
    key: str
    value: float | int
    macs: int
    target: int

    @property
    def rel_error(self) -> float:
        """``macs / target - 1``."""
        return self.macs / self.target - 1.0

    def to_dict(self) -> dict:
        return dict(asdict(self), rel_error=self.rel_error)


def with_budget(reduction: dict, key: str, value: float | int) -> dict:
    """``reduction`` with its budget set to ``value`` (one value for every reduction layer)."""
    out = {k: v for k, v in reduction.items() if k not in ("keep_ratio", "r")}
    out[key] = int(value) if key == "r" else float(value)
    return out


def bisect_budget(
    macs_of: Callable[[float], int],
    target: int,
    lo: float,
    hi: float,
    integer: bool = False,
    tol: float = 0.01,
    steps: int = 60,
    what: str = "budget",
) -> tuple[float | int, int]:
    """``(budget, macs)``: the budget in ``[lo, hi]`` (``integer``: integers only, ToMe's
    ``r``) whose MACs ``macs_of(budget)`` are closest to ``target``, by bisection.

    ``macs_of`` must be monotonic (either direction) and may be piecewise constant (token counts
    are integers): the bracket's ends stay on either side of ``target`` and the better end wins.
    Raises ``ValueError`` (naming ``what``) when the target lies outside the interval's MACs or
    no budget comes within ``tol`` (``|macs / target - 1|``; the message gives the closest).
    """
    if not lo < hi:
        raise ValueError(f"{what}: empty search interval [{lo}, {hi}]")
    f_lo, f_hi = macs_of(lo), macs_of(hi)
    rising = f_hi >= f_lo
    low_end, high_end = (lo, hi) if rising else (hi, lo)  # budgets giving fewer / more MACs
    if not min(f_lo, f_hi) * (1 - tol) <= target <= max(f_lo, f_hi) * (1 + tol):
        raise ValueError(
            f"{what}: {target / 1e9:.4f} GMACs is outside what [{lo}, {hi}] gives "
            f"({min(f_lo, f_hi) / 1e9:.4f} to {max(f_lo, f_hi) / 1e9:.4f} GMACs)"
        )
    below, above = low_end, high_end  # macs_of(below) <= target <= macs_of(above) (or an end)
    for _ in range(steps if not integer else 64):
        if integer and abs(above - below) <= 1:
            break
        mid = (below + above) // 2 if integer else (below + above) / 2
        if macs_of(mid) <= target:
            below = mid
        else:
            above = mid
    best = min((below, above), key=lambda v: abs(macs_of(v) - target))
    macs = macs_of(best)
    if not integer:  # the shortest decimal with the same MACs (token counts are integers)
        best = next((r for d in range(2, 9) if macs_of(r := round(best, d)) == macs), best)
    if abs(macs / target - 1) > tol:
        raise ValueError(
            f"{what}: no budget in [{lo}, {hi}] comes within {100 * tol:g}% of "
            f"{target / 1e9:.4f} GMACs (closest: {best} at {macs / 1e9:.4f} GMACs)"
        )
    return best, macs


def match_budget(reduction: dict, target: int, shape: ViTShape, tol: float = 0.01) -> MatchedBudget:
    """``reduction`` with the budget whose backbone MACs on ``shape`` are within ``tol`` of
    ``target``: one keep ratio for every reduction layer in [0.5, 1] (ToMe's bipartite
    matching merges at most half the tokens of a layer), or a token count ``r`` in [0, tokens];
    ``ValueError`` when none in the interval is close enough."""
    # A token count ``r`` when the reduction has no keep ratio (ToMe's constant schedule).
    key = "r" if ReductionConfig.from_dict(reduction).keep_ratio is None else "keep_ratio"
    method = reduction.get("method", "fatr")

    def macs_of(value: float | int) -> int:
        return shape.macs(with_budget(reduction, key, value))

    if key == "r":
        lo, hi, integer = 0, math.prod(shape.grid), True
    else:
        lo, hi, integer = 0.5, 1.0, False
    value, macs = bisect_budget(macs_of, target, lo, hi, integer=integer, tol=tol,
                                what=f"method {method!r}, {key}")  # fmt: skip
    return MatchedBudget(with_budget(reduction, key, value), key, value, macs, target)
