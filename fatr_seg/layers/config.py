"""The one validated configuration of a token reduction."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["METHODS", "REDUCTION_DEFAULTS", "ReductionConfig"]

METHODS = ("fatr", "random", "evit", "tome")
SCORES = ("exact", "logit_proxy")
REWEIGHTS = ("identity", "paper", None)
RESTORES = ("dc", "residual")

REDUCTION_DEFAULTS: dict[str, Any] = dict(
    method="fatr",
    layers=(4, 7, 10),
    keep_ratio=0.7,
    windows=(2, 2, 1),
    score="exact",
    reweight="identity",
    restore="dc",
)


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"reduction.{key}={value!r} is invalid: {allowed}")


def _as_tuple(cfg: dict, key: str, kind: type) -> tuple:
    """``cfg[key]`` as a tuple of ``kind`` (int or float), or a ValueError naming the key."""
    value = cfg[key]
    if isinstance(value, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        if kind is int and not all(isinstance(v, int) for v in value):
            _fail(key, value, "values must be integers")
        return tuple(kind(v) for v in value)
    _fail(key, value, f"give a list or tuple of {kind.__name__}s")


@dataclass(frozen=True)
class ReductionConfig:
    """Token reduction settings, validated at construction.

    Attributes:
        method: ``'fatr'`` (frequency-aware), ``'random'`` (random keep, same DC aggregation),
            ``'evit'`` (top-k by CLS attention, the rest fused into one attention-weighted token;
            ``windows`` is ignored) or ``'tome'`` (bipartite soft matching with proportional
            attention; ``keep_ratio`` ≥ 0.5, ``restore='dc'``).
        layers: 1-indexed blocks that reduce (as in the paper), strictly increasing.
        keep_ratio: Fraction of the patch tokens present that each reduction layer keeps, in
            (0, 1]; one float for all layers or one per layer.
        windows: DC windows per side at each reduction layer; non-increasing, each dividing the
            previous one (so DC windows nest and merge exactly by count).
        score: ``'exact'`` (column mean of softmax attention) or ``'logit_proxy'``.
        reweight: ``'identity'`` (starts as plain attention), ``'paper'`` (ω = 0 in the paper's
            formula) or None (no reweighting).
        restore: ``'dc'`` or ``'residual'`` (see :func:`fatr_seg.ops.restore_tokens`).
    """

    method: str = "fatr"
    layers: tuple[int, ...] = (4, 7, 10)
    keep_ratio: tuple[float, ...] = (0.7, 0.7, 0.7)
    windows: tuple[int, ...] = (2, 2, 1)
    score: str = "exact"
    reweight: str | None = "identity"
    restore: str = "dc"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            _fail("method", self.method, f"choose one of {METHODS}")
        if not self.layers:
            _fail("layers", self.layers, "give at least one layer (or reduction=None)")
        if any(not isinstance(i, int) or i < 1 for i in self.layers):
            _fail("layers", self.layers, "layers are 1-indexed positive integers")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
            _fail("layers", self.layers, "layers must be strictly increasing")
        if len(self.keep_ratio) != len(self.layers):
            _fail("keep_ratio", self.keep_ratio, f"give one value or {len(self.layers)} values")
        if any(not 0.0 < float(r) <= 1.0 for r in self.keep_ratio):
            _fail("keep_ratio", self.keep_ratio, "each value must lie in (0, 1]")
        if len(self.windows) != len(self.layers):
            _fail("windows", self.windows, f"give {len(self.layers)} values, one per layer")
        if any(not isinstance(w, int) or w < 1 for w in self.windows):
            _fail("windows", self.windows, "windows per side are positive integers")
        if any(a % b for a, b in zip(self.windows, self.windows[1:], strict=False)):
            _fail("windows", self.windows, "each value must divide the previous one, e.g. (2,2,1)")
        if self.score not in SCORES:
            _fail("score", self.score, f"choose one of {SCORES}")
        if self.reweight not in REWEIGHTS:
            _fail("reweight", self.reweight, f"choose one of {REWEIGHTS}")
        if self.restore not in RESTORES:
            _fail("restore", self.restore, f"choose one of {RESTORES}")
        if self.method == "tome" and any(float(r) < 0.5 for r in self.keep_ratio):
            _fail("keep_ratio", self.keep_ratio, "ToMe merges at most half the tokens per layer")
        if self.method == "tome" and self.restore != "dc":
            _fail("restore", self.restore, "ToMe merges tokens, it has no 'residual' to keep")

    @classmethod
    def from_dict(cls, cfg: dict | None, depth: int | None = None) -> ReductionConfig | None:
        """Build from a config dict; unknown keys and out-of-range layers raise ``ValueError``.

        Missing keys take :data:`REDUCTION_DEFAULTS`. ``None`` means no reduction.
        """
        if cfg is None:
            return None
        if isinstance(cfg, ReductionConfig):
            out = cfg
        else:
            if not isinstance(cfg, dict):
                raise ValueError(f"reduction must be a dict or None, got {type(cfg).__name__}")
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(cfg) - known)
            if unknown:
                raise ValueError(
                    f"reduction has unknown key(s) {unknown}; valid keys are {sorted(known)}"
                )
            merged = {**REDUCTION_DEFAULTS, **cfg}
            if merged["method"] in ("evit", "tome") and "windows" not in cfg:
                # They have no DC windows; don't validate the FATR default against their layers.
                merged["windows"] = (1,) * len(tuple(merged["layers"]) if isinstance(
                    merged["layers"], list | tuple) else ())  # fmt: skip
            layers = _as_tuple(merged, "layers", int)
            ratio = merged["keep_ratio"]
            if isinstance(ratio, int | float) and not isinstance(ratio, bool):
                ratio = (float(ratio),) * len(layers)
            else:
                ratio = _as_tuple(merged, "keep_ratio", float)
            out = cls(
                method=merged["method"],
                layers=layers,
                keep_ratio=ratio,
                windows=_as_tuple(merged, "windows", int),
                score=merged["score"],
                reweight=merged["reweight"],
                restore=merged["restore"],
            )
        if depth is not None and out.layers[-1] > depth:
            _fail("layers", out.layers, f"the model has {depth} blocks (layers are 1-indexed)")
        return out

    def index(self, block: int) -> int | None:
        """Position of 0-indexed ``block`` among the reduction layers, or None."""
        try:
            return self.layers.index(block + 1)
        except ValueError:
            return None
