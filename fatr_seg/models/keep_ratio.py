"""The reduction budget chosen on the command line: ``--keep-ratio`` of the test and benchmark
tools.

``tools/test.py --keep-ratio R`` evaluates a checkpoint at another budget, and
``tools/benchmark.py --keep-ratio R1 R2 ...`` times one row per budget, without retraining: the
keep ratio is no parameter (a checkpoint does not depend on it), and a model built with a ratio
computes exactly what the same model does after ``backbone.set_keep_ratio`` with it. Both tools
write the ratio into the config's ``model.backbone.reduction`` before the model is built
(:func:`set_config_keep_ratio`), after checking it here, so that a bad value stops the tool with
one line naming ``--keep-ratio`` before anything is built.

The values follow :meth:`fatr_seg.layers.ReductionConfig.with_keep_ratio`: one ratio in (0, 1]
for every reduction layer, or one per reduction layer. On the command line a per-layer budget is
several values (``--keep-ratio 0.5 0.6 0.7`` of the test tool) or values joined by commas
(``0.5,0.6,0.7``, which the benchmark needs because its values are one budget each).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..layers.config import ReductionConfig
from .preflight import PreflightError

__all__ = [
    "KeepRatioError",
    "format_keep_ratio",
    "parse_keep_ratio",
    "reduction_layers",
    "set_config_keep_ratio",
]

OPTION = "--keep-ratio"
ALLOWED = "a number in (0, 1], or one per reduction layer"


class KeepRatioError(PreflightError):
    """A ``--keep-ratio`` value the model cannot take; the message is one line naming it."""


def _shown(tokens: Sequence[str]) -> str:
    return " ".join(str(t) for t in tokens)


def parse_keep_ratio(tokens: str | Sequence[str]) -> float | tuple[float, ...]:
    """One budget from command-line text: ``'0.5'`` -> 0.5, ``['0.5', '0.6']`` or ``'0.5,0.6'``
    -> ``(0.5, 0.6)`` (one per reduction layer).

    Raises:
        KeepRatioError: A value that is not a number or lies outside (0, 1].
    """
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    parts = [p.strip() for t in tokens for p in str(t).split(",")]
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise KeepRatioError(
                f"{OPTION} {_shown(tokens)}: {part!r} is not a number; give {ALLOWED}"
            ) from None
        if not 0.0 < value <= 1.0:  # NaN fails too
            raise KeepRatioError(f"{OPTION} {_shown(tokens)}: {part} is outside (0, 1]; "
                                 f"give {ALLOWED}")  # fmt: skip
        values.append(value)
    if not values:
        raise KeepRatioError(f"{OPTION} needs a value: give {ALLOWED}")
    return values[0] if len(values) == 1 else tuple(values)


def format_keep_ratio(keep_ratio: float | Sequence[float]) -> str:
    """``0.5`` -> ``'0.5'``, ``(0.5, 0.6, 0.7)`` -> ``'0.5,0.6,0.7'`` (the form it is given in)."""
    values = keep_ratio if isinstance(keep_ratio, Sequence) else [keep_ratio]
    return ",".join(format(float(v), "g") for v in values)


def reduction_layers(cfg) -> tuple[int, ...] | None:
    """The 1-indexed reduction layers of the model ``cfg`` describes, None without reduction."""
    backbone = (cfg.get("model") or {}).get("backbone") or {}
    reduction = backbone.get("reduction")
    return None if reduction is None else ReductionConfig.from_dict(reduction).layers


def set_config_keep_ratio(cfg, keep_ratio, what: str) -> tuple[float, ...]:
    """Set ``cfg.model.backbone.reduction.keep_ratio`` (a token count ``r`` is replaced).

    Args:
        cfg: An mmengine ``Config``; changed in place.
        keep_ratio: A float, a per-layer tuple, or command-line text (see
            :func:`parse_keep_ratio`).
        what: The config's name, for the messages.

    Returns:
        The ratio of each reduction layer.

    Raises:
        KeepRatioError: The value is invalid, gives another number of values than the model
            has reduction layers, or the model has no reduction.
    """
    given = keep_ratio
    if isinstance(keep_ratio, str) or (
        isinstance(keep_ratio, Sequence) and any(isinstance(v, str) for v in keep_ratio)
    ):
        keep_ratio = parse_keep_ratio(keep_ratio)
    if isinstance(given, str) or not isinstance(given, Sequence):
        shown = str(given)
    elif all(isinstance(v, str) for v in given):
        shown = _shown(given)  # the test tool's values, as typed
    else:
        shown = format_keep_ratio(given)
    layers = reduction_layers(cfg)
    if layers is None:
        raise KeepRatioError(
            f"{OPTION} {shown}: {what} has no token reduction (model.backbone.reduction is "
            "None), so there is no budget to set; give a FATR config"
        )
    count = len(keep_ratio) if isinstance(keep_ratio, Sequence) else 1
    if count not in (1, len(layers)):
        raise KeepRatioError(
            f"{OPTION} {shown}: {what} reduces at {len(layers)} layers {tuple(layers)}; give one "
            f"number in (0, 1] or {len(layers)}, one per layer"
        )
    reduction = cfg.model.backbone.reduction
    try:  # the ratio's own rules, and the method's (ToMe's bipartite score keeps >= half)
        ratios = ReductionConfig.from_dict(reduction).with_keep_ratio(keep_ratio).keep_ratio
    except ValueError as err:
        raise KeepRatioError(f"{OPTION} {shown}: {what}: {err}") from None
    reduction.pop("r", None)
    reduction["keep_ratio"] = ratios
    return ratios
