"""The one validated configuration of a token reduction: a score plus an aggregation per layer.

Every method is a combination. A reduction layer ranks the patch tokens by a **score** and keeps
the top ``ceil(keep_ratio · M)`` (or all but ``r``); an **aggregation** says what becomes of the
others:

========== ===================================================================================
score      ``'hf'`` FATR's exact HF score (attention a token receives), ``'hf_proxy'`` its
           pre-softmax proxy, ``'hf_bipartite'`` (the HF score protects the top ``protect``
           fraction; the others are matched as ToMe matches), ``'random'``,
           ``'random_bipartite'`` (the same with a random protected set), ``'cls'`` (EViT:
           CLS attention), ``'bipartite'`` (ToMe: A tokens by similarity to their B partner);
           local windows on the unreduced grid (first reduction layer only; ``local_window``
           sets the side): ``'window_hf'`` (FATR's early local stage: whole windows whose
           tokens all have low HF scores fold into one token, a fixed count per image),
           ``'window_random'`` (its control: random whole windows), ``'window'`` (ALGM:
           windows by their inner similarity, most similar first)
aggregate  ``'merge'`` (join the most similar kept token, or the partner the score proposes;
           size-weighted, proportional attention), ``'dc'`` (fold into local DC tokens, the
           paper's form), ``'fuse'`` (EViT: one token, the CLS-attention-weighted sum)
========== ===================================================================================

``method`` names a preset (:data:`PRESETS`) that fills every key the config leaves out, so a
peer gets its own defaults (``dict(method='tome')`` has no FATR reweighting). A config that
gives DC windows (``windows`` or ``window_size``) but no ``aggregate`` aggregates into them
(``'dc'``), as configs did before merging existed; a preset whose score proposes merge
partners (``'hf_bipartite'``) then ranks by its plain score (``'hf'``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from ..ops.select import num_keep
from ..ops.windows import num_windows

__all__ = ["AGGREGATES", "METHODS", "PRESETS", "REDUCTION_DEFAULTS", "SCORES", "ReductionConfig"]

SCORES = ("hf", "hf_proxy", "hf_bipartite", "random", "random_bipartite", "cls", "bipartite",
          "window", "window_hf", "window_random")  # fmt: skip
AGGREGATES = ("merge", "dc", "fuse")
# Scores that propose the partner each dropped token joins (they need aggregate 'merge').
PARTNER_SCORES = ("bipartite", "hf_bipartite", "random_bipartite", "window", "window_hf",
                  "window_random")  # fmt: skip
# Scores on the unreduced grid's local windows (first reduction layer only) ...
LOCAL_SCORES = ("window", "window_hf", "window_random")
# ... and those that fold whole windows, a fixed count per image (ALGM's keeps its token budget).
WHOLE_WINDOW_SCORES = ("window_hf", "window_random")
# Bipartite matching among the tokens a score leaves unprotected, and the ranking it protects by.
PROTECTING_SCORES = ("hf_bipartite", "random_bipartite")
_RANKING_OF = {"hf_bipartite": "hf", "random_bipartite": "random", "window_hf": "hf",
               "window_random": "random"}  # fmt: skip
METRICS = ("keys", "x")
REWEIGHTS = ("identity", "paper", None)
RESTORES = ("copy", "residual")
# Names of earlier versions, still accepted.
_SCORE_ALIASES = {"exact": "hf", "logit_proxy": "hf_proxy"}
_RESTORE_ALIASES = {"dc": "copy"}

_FATR = dict(
    layers=(4, 7, 10),
    keep_ratio=0.7,
    score="hf_bipartite",
    protect=0.2,
    aggregate="merge",
    metric="keys",
    prop_attn=False,
    reweight="identity",
    restore="copy",
)
# The default configs' schedule: an early local stage, then two global stages (docs/study.md).
_FATR_LOCAL = dict(
    _FATR,
    layers=(2, 5, 8),
    keep_ratio=(0.55, 0.6, 0.8),
    score=("window_hf", "hf_bipartite", "hf_bipartite"),
    local_window=2,
    prop_attn=True,
    score_queries=256,  # the exact score's mIoU on CamVid, fewer logits (docs/benchmarks.md)
)
# ToMe's reduction, whatever its schedule: bipartite matching on the keys, size-weighted merging
# with its proportional attention, no reweighting.
_TOME = dict(score="bipartite", aggregate="merge", metric="keys", prop_attn=True, reweight=None,
             restore="copy")  # fmt: skip
#: Preset per ``method``: every key a config leaves out comes from its method's preset.
PRESETS: dict[str, dict[str, Any]] = {
    # The dense default: the HF score protects the top fifth of the tokens; the others merge
    # pairwise with their most similar partner (bipartite matching), size-weighted.
    "fatr": _FATR,
    # Faster: an early local stage (block 2 folds whole 2x2 windows whose tokens all have low
    # HF scores, a fixed count per image), then the default's global merging at blocks 5 and 8;
    # merged tokens weigh their size in attention.
    "fatr_local": _FATR_LOCAL,
    # The paper's literal configuration: LF tokens folded into 2x2, 2x2, 1x1 DC windows.
    "fatr_paper": dict(
        layers=(4, 7, 10),
        keep_ratio=0.7,
        score="hf",
        aggregate="dc",
        windows=(2, 2, 1),
        reweight="identity",
        restore="copy",
    ),  # fmt: skip
    # Control for the score: the default with a random protected set.
    "random": dict(_FATR, score="random_bipartite"),
    "evit": dict(
        layers=(4, 7, 10),
        keep_ratio=0.7,
        score="cls",
        aggregate="fuse",
        reweight=None,
        restore="copy",
    ),  # fmt: skip
    # ToMe at the same three layers and keep ratio as FATR (the matched schedule) ...
    "tome": dict(layers=(4, 7, 10), keep_ratio=0.7, **_TOME),
    # ... and with its own constant schedule: r tokens merged in every block.
    "tome_constant": dict(layers=tuple(range(1, 13)), r=16, **_TOME),
    # ALGM: local 2x2 merging after block 1, global bipartite merging after block 5, on the
    # block's output tokens; a fixed budget per batch instead of ALGM's similarity threshold.
    # Its code computes sizes but its attention ignores them: no proportional attention.
    "algm": dict(
        layers=(1, 5),
        keep_ratio=(0.7, 0.7),
        score=("window", "bipartite"),
        aggregate="merge",
        metric="x",
        prop_attn=False,
        reweight=None,
        restore="copy",
    ),  # fmt: skip
}
METHODS = tuple(PRESETS)
#: The default configs' reduction (``configs/_base_/fatr_segmenter_vit-s.py``), every key given:
#: the early local stage, trained unreduced. An empty dict is still ``method='fatr'``.
REDUCTION_DEFAULTS: dict[str, Any] = dict(method="fatr_local", **_FATR_LOCAL,
                                          reduce_in_training=False)  # fmt: skip


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"reduction.{key}={value!r} is invalid: {allowed}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _per_layer(cfg: dict, key: str, n: int, kind: type, allowed: str = "") -> tuple | None:
    """``cfg[key]`` as one value per layer (a single value is repeated), or a ValueError."""
    value = cfg.get(key)
    if value is None:
        return None
    values = tuple(value) if isinstance(value, list | tuple) else (value,) * n
    if len(values) != n:
        _fail(key, value, f"give one value or {n} values, one per layer")
    for v in values:
        ok = isinstance(v, str) if kind is str else _is_number(v)
        if kind is int and ok and (not float(v).is_integer() or isinstance(v, float)):
            ok = False
        if not ok:
            _fail(key, value, allowed or f"values must be {kind.__name__}s")
    return tuple(kind(v) for v in values)


@dataclass(frozen=True)
class ReductionConfig:
    """Token reduction settings, validated at construction.

    Attributes:
        method: The preset the config started from (see :data:`PRESETS`).
        layers: 1-indexed blocks that reduce (as in the paper), strictly increasing.
        keep_ratio: Per layer, the fraction of the patch tokens present that it keeps, in
            (0, 1]; None when ``r`` sets the budget.
        r: Per layer, the number of patch tokens it removes (ToMe's ``r``); None when
            ``keep_ratio`` sets the budget.
        score: Per layer, the score function (see the module docstring).
        aggregate: Per layer, the aggregation (see the module docstring).
        windows: For ``'dc'`` layers: DC windows per side (the paper's form); each dividing the
            previous one, so DC windows nest and merge exactly by count.
        window_size: For ``'dc'`` layers: DC window side in patches, so windows stay local at
            any input size; each a multiple of the previous one. Exclusive with ``windows``.
        metric: Similarity features for ``'merge'`` and the similarity scores: ``'keys'``
            (the block's keys averaged over heads, as ToMe) or ``'x'`` (its output tokens, as
            ALGM).
        merge_radius: For ``'merge'`` with no partner proposed by the score: prefer kept tokens
            within this many patches (None: anywhere).
        local_window: Side in patches of the local windows of the ``'window*'`` scores. A
            whole-window score folds ``F = ⌊(M - ceil(keep_ratio · M)) / (w² - 1)⌋`` windows
            (or ``⌊r / (w² - 1)⌋``), at most all of them, so it keeps at least its budget.
        score_queries: Estimate the HF scores (``'hf'``, ``'hf_bipartite'``, ``'window_hf'``)
            from about this many strided query rows instead of all of them (exact
            probabilities from the attention's log-sum-exp; see :func:`fatr_seg.ops.hf_scores`);
            None: the exact column mean.
        protect: For ``'hf_bipartite'`` (``'random_bipartite'``): the fraction of the patch
            tokens present that the HF score (chance) protects: kept, merged with nothing. The
            others are matched as ToMe does.
        prop_attn: For ``'merge'``: later blocks attend to a merged token with ``log(size)``
            added to its logit (ToMe's proportional attention), as if to all its patches.
        reduce_in_training: Whether the reduction also runs in training mode. False trains
            the unreduced model (every token in every block) and reduces only in eval mode:
            the measured way to fine-tune for an early local stage (docs/study.md).
        reweight: ``'identity'`` (starts as plain attention), ``'paper'`` (ω = 0 in the paper's
            formula) or None (no reweighting).
        restore: ``'copy'`` (an aggregated patch gets its representative's token) or
            ``'residual'`` (plus what it lacked at aggregation; see
            :func:`fatr_seg.ops.accumulate_residual`).
    """

    method: str = "fatr"
    layers: tuple[int, ...] = (4, 7, 10)
    keep_ratio: tuple[float, ...] | None = (0.7, 0.7, 0.7)
    r: tuple[int, ...] | None = None
    score: tuple[str, ...] = ("hf_bipartite",) * 3
    aggregate: tuple[str, ...] = ("merge", "merge", "merge")
    windows: tuple[int, ...] | None = None
    window_size: tuple[int, ...] | None = None
    metric: str = "keys"
    merge_radius: int | None = None
    local_window: int = 2
    score_queries: int | None = None
    protect: float = 0.2
    prop_attn: bool = False
    reduce_in_training: bool = True
    reweight: str | None = "identity"
    restore: str = "copy"

    def __post_init__(self) -> None:  # noqa: C901 - one check per rule, in order
        n = len(self.layers)
        if self.method not in METHODS:
            _fail("method", self.method, f"choose one of {METHODS}")
        if not n:
            _fail("layers", self.layers, "give at least one layer (or reduction=None)")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 1 for i in self.layers):
            _fail("layers", self.layers, "layers are 1-indexed positive integers")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
            _fail("layers", self.layers, "layers must be strictly increasing")
        if (self.keep_ratio is None) == (self.r is None):
            _fail("keep_ratio", self.keep_ratio, "give exactly one of keep_ratio and r")
        if self.keep_ratio is not None:
            if len(self.keep_ratio) != n:
                _fail("keep_ratio", self.keep_ratio, f"give one value or {n} values")
            if any(not (_is_number(v) and 0.0 < float(v) <= 1.0) for v in self.keep_ratio):
                _fail("keep_ratio", self.keep_ratio, "each value must lie in (0, 1]")
        if self.r is not None and (len(self.r) != n or any(v < 0 for v in self.r)):
            _fail("r", self.r, f"give one or {n} non-negative integers")
        for key, allowed in (("score", SCORES), ("aggregate", AGGREGATES)):
            value = getattr(self, key)
            if len(value) != n or any(v not in allowed for v in value):
                _fail(key, value, f"choose from {allowed}, one value or {n} values")
        if (
            not isinstance(self.local_window, int)
            or isinstance(self.local_window, bool)
            or (self.local_window < 2)
        ):
            _fail("local_window", self.local_window, "a window side in patches, an integer >= 2")
        self._check_dc(n)
        for j, (score, agg) in enumerate(zip(self.score, self.aggregate, strict=True)):
            if score in PARTNER_SCORES and agg != "merge":
                _fail("aggregate", self.aggregate, f"score {score!r} proposes partners: "
                      "it needs aggregate 'merge'")  # fmt: skip
            if agg == "fuse" and score != "cls":
                _fail("aggregate", self.aggregate, "'fuse' weights tokens by their CLS "
                      "attention: it needs score 'cls'")  # fmt: skip
            if score in LOCAL_SCORES and j != 0:
                _fail("score", self.score, f"{score!r} needs the unreduced grid: only the "
                      "first reduction layer can use it (a local stage cannot follow a global "
                      "one)")  # fmt: skip
            if score in WHOLE_WINDOW_SCORES and self.keep_ratio:
                s = self.local_window**2
                if self.keep_ratio[j] < 1.0 / s:
                    _fail("keep_ratio", self.keep_ratio, f"{score!r} folds whole "
                          f"{self.local_window}x{self.local_window} windows into one token "
                          f"each: it keeps at least 1/{s} of the tokens, so keep_ratio >= "
                          f"{1.0 / s:g} at layer {self.layers[j]}")  # fmt: skip
            if score == "bipartite" and self.keep_ratio and self.keep_ratio[j] < 0.5:
                _fail("keep_ratio", self.keep_ratio, "bipartite matching (ToMe) merges at most "
                      "half the tokens per layer: use keep_ratio >= 0.5")  # fmt: skip
        if self.score_queries is not None and (
            not isinstance(self.score_queries, int) or isinstance(self.score_queries, bool)
            or self.score_queries < 1
        ):  # fmt: skip
            _fail("score_queries", self.score_queries, "a positive number of query rows, or None")
        if self.metric not in METRICS:
            _fail("metric", self.metric, f"choose one of {METRICS}")
        if not (_is_number(self.protect) and 0.0 <= float(self.protect) < 1.0):
            _fail("protect", self.protect, "a fraction in [0, 1)")
        if not isinstance(self.prop_attn, bool):
            _fail("prop_attn", self.prop_attn, "True or False")
        if not isinstance(self.reduce_in_training, bool):
            _fail("reduce_in_training", self.reduce_in_training, "True or False")
        if self.merge_radius is not None and (
            not isinstance(self.merge_radius, int) or self.merge_radius < 1
        ):
            _fail("merge_radius", self.merge_radius, "a positive integer (patches) or None")
        if self.reweight not in REWEIGHTS:
            _fail("reweight", self.reweight, f"choose one of {REWEIGHTS}")
        if self.restore not in RESTORES:
            _fail("restore", self.restore, f"choose one of {RESTORES}")

    def _check_dc(self, n: int) -> None:
        dc_layers = [j for j, a in enumerate(self.aggregate) if a == "dc"]
        if self.windows is not None and self.window_size is not None:
            _fail("windows", self.windows, "give windows (per side) or window_size, not both")
        for key in ("windows", "window_size"):
            value = getattr(self, key)
            if value is None:
                continue
            if not dc_layers:
                _fail(key, value, "only 'dc' aggregation has DC windows")
            if len(value) != n or any(not isinstance(v, int) or v < 1 for v in value):
                _fail(key, value, f"give one positive integer or {n}, one per layer")
            used = [value[j] for j in dc_layers]
            pairs = zip(used, used[1:], strict=False)
            if key == "windows" and any(a % b for a, b in pairs):
                _fail(key, value, "each value must divide the previous one, e.g. (2,2,1)")
            if key == "window_size" and any(b % a for a, b in pairs):
                _fail(key, value, "each value must be a multiple of the previous one, e.g. (4,8)")
        if dc_layers and self.windows is None and self.window_size is None:
            _fail("aggregate", self.aggregate, "'dc' needs windows (per side) or window_size")

    def dc_grid(self, j: int) -> tuple[str, int] | None:
        """The DC windows of reduction layer ``j`` (see :func:`fatr_seg.ops.dc_window_ids`)."""
        if self.aggregate[j] != "dc":
            return None
        return ("side", self.windows[j]) if self.windows else ("size", self.window_size[j])

    def num_keep(self, j: int, num_tokens: int, hw_shape: tuple[int, int] | None = None) -> int:
        """Patch tokens reduction layer ``j`` keeps of ``num_tokens`` (M).

        ``ceil(keep_ratio · M)`` or ``M - r``, at least 1; bipartite matching merges at most one
        token per A-B pair, so it keeps at least ``ceil(M / 2)`` (ToMe clamps ``r`` the same way;
        a protecting score gives up protection before, :meth:`num_protected`). A whole-window
        score rounds the tokens it removes down to whole windows of the (H, W) grid
        ``hw_shape``, which it needs.
        """
        if self.keep_ratio is not None:
            keep = num_keep(self.keep_ratio[j], num_tokens)
        else:
            keep = max(1, num_tokens - self.r[j])
        if self.score[j] in WHOLE_WINDOW_SCORES:
            if hw_shape is None:
                raise ValueError(f"num_keep of a {self.score[j]!r} layer needs the grid hw_shape")
            per = self.local_window**2 - 1
            folded = min(num_windows(hw_shape, self.local_window), (num_tokens - keep) // per)
            return num_tokens - folded * per
        if self.score[j] == "bipartite" or self.score[j] in PROTECTING_SCORES:
            keep = max(keep, num_tokens - num_tokens // 2)
        return keep

    def num_protected(self, num_tokens: int, keep: int) -> int:
        """Patch tokens a protecting score keeps out of the matching, when ``keep`` of M stay.

        ``ceil(protect · M)``, but no more than leaves the matching a choice: it pairs only the
        unprotected tokens, and its ``⌊(M - P) / 2⌋`` A tokens must supply the ``M - keep``
        merges with at most 4 in 5 of them merging (ToMe's own share at keep 0.6), else nothing
        is protected (plain bipartite matching). So protection is whole down to keep 0.7 for
        the default (``protect=0.2``: 3 in 4 A tokens merge), shrinks below it, and is gone at
        0.6 (give or take a token of rounding). At 0.6, full protection (every A token merging,
        wanted or not) lost 0.5 to 0.8 mIoU training-free against none
        (docs/history/study-2026-11.md).
        """
        if self.protect <= 0:
            return 0
        a_needed = -(-5 * (num_tokens - keep) // 4)  # ceil((M - keep) / 0.8)
        return min(num_keep(self.protect, num_tokens), max(0, num_tokens - 2 * a_needed))

    def with_keep_ratio(self, keep_ratio: float | tuple[float, ...]) -> ReductionConfig:
        """A copy with another budget (one ratio, or one per layer); validated like any config."""
        n = len(self.layers)
        values = tuple(keep_ratio) if isinstance(keep_ratio, list | tuple) else (keep_ratio,)
        if not values or not all(_is_number(v) for v in values):
            _fail("keep_ratio", keep_ratio, f"give a number in (0, 1], or {n}, one per layer")
        if len(values) not in (1, n):
            _fail("keep_ratio", keep_ratio, f"give one value or {n} values, one per layer")
        if any(not 0.0 < float(v) <= 1.0 for v in values):
            _fail("keep_ratio", keep_ratio, "each value must lie in (0, 1]")
        ratio = tuple(float(v) for v in values) * (n if len(values) == 1 else 1)
        return replace(self, keep_ratio=ratio, r=None)

    @classmethod
    def from_dict(cls, cfg: dict | None, depth: int | None = None) -> ReductionConfig | None:
        """Build from a config dict; unknown keys and out-of-range layers raise ``ValueError``.

        Keys the dict leaves out come from the preset of its ``method`` (default ``'fatr'``).
        ``None`` means no reduction.
        """
        if cfg is None:
            return None
        if isinstance(cfg, ReductionConfig):
            out = cfg
        else:
            layers = cfg.get("layers") if isinstance(cfg, dict) else None
            if (
                depth is not None
                and isinstance(layers, list | tuple)
                and any(isinstance(i, int) and i > depth for i in layers)
            ):  # named before any per-layer key that its length would fault
                _fail("layers", tuple(layers), f"the model has {depth} blocks (layers are "
                      "1-indexed)")  # fmt: skip
            out = cls._from_mapping(cfg)
        if depth is not None and out.layers[-1] > depth:
            _fail("layers", out.layers, f"the model has {depth} blocks (layers are 1-indexed)")
        return out

    @classmethod
    def _from_mapping(cls, cfg: dict) -> ReductionConfig:
        if not isinstance(cfg, dict):
            raise ValueError(f"reduction must be a dict or None, got {type(cfg).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(
                f"reduction has unknown key(s) {unknown}; valid keys are {sorted(known)}"
            )
        method = cfg.get("method", "fatr")
        if method not in PRESETS:
            _fail("method", method, f"choose one of {METHODS}")
        merged = {**PRESETS[method], **cfg}
        if ("windows" in cfg or "window_size" in cfg) and "aggregate" not in cfg:
            merged["aggregate"] = "dc"  # DC windows given: the paper's aggregation is meant
        if "r" in cfg and "keep_ratio" not in cfg:
            merged.pop("keep_ratio", None)
        if "keep_ratio" in cfg and "r" not in cfg:
            merged.pop("r", None)
        layers = merged["layers"]
        if not isinstance(layers, list | tuple):
            _fail("layers", layers, "give a list or tuple of 1-indexed block numbers")
        n = len(layers)
        for key, value in PRESETS[method].items():
            per_layer = isinstance(value, tuple) and key != "layers"
            if per_layer and key not in cfg and len(value) != n and n:  # n = 0: see layers
                _fail(key, value, f"method {method!r} gives it for {len(value)} layers; give "
                      f"{key} for your {n} layers too")  # fmt: skip
        score = merged["score"]
        score = [_SCORE_ALIASES.get(s, s) for s in (score if isinstance(score, list | tuple)
                                                    else [score] * n)]  # fmt: skip
        if "score" not in cfg:
            # A preset's matching score proposes partners, which only merging takes; with
            # another aggregation the preset ranks by its score alone.
            aggregate = merged["aggregate"]
            aggregate = aggregate if isinstance(aggregate, list | tuple) else [aggregate] * n
            if len(aggregate) == n:
                score = [_RANKING_OF.get(sc, sc) if ag != "merge" else sc
                         for sc, ag in zip(score, aggregate)]  # fmt: skip
        restore = _RESTORE_ALIASES.get(merged["restore"], merged["restore"])
        return cls(
            method=method,
            layers=tuple(layers),
            keep_ratio=_per_layer(merged, "keep_ratio", n, float),
            r=_per_layer(merged, "r", n, int),
            score=_per_layer(dict(score=score), "score", n, str),
            aggregate=_per_layer(merged, "aggregate", n, str),
            windows=_per_layer(merged, "windows", n, int),
            window_size=_per_layer(merged, "window_size", n, int),
            metric=merged.get("metric", "keys"),
            merge_radius=merged.get("merge_radius"),
            local_window=merged.get("local_window", 2),
            score_queries=merged.get("score_queries"),
            protect=merged.get("protect", 0.2),
            prop_attn=merged.get("prop_attn", False),
            reduce_in_training=merged.get("reduce_in_training", True),
            reweight=merged["reweight"],
            restore=restore,
        )

    def check_grid(self, hw_shape: tuple[int, int], key: str = "img_size") -> None:
        """Fail, naming the key, when a local window does not fit the (H, W) patch grid."""
        if any(s in LOCAL_SCORES for s in self.score) and min(hw_shape) < self.local_window:
            _fail("local_window", self.local_window, f"the {key} gives a {hw_shape[0]}x"
                  f"{hw_shape[1]} patch grid, smaller than one window")  # fmt: skip

    def index(self, block: int) -> int | None:
        """Position of 0-indexed ``block`` among the reduction layers, or None."""
        try:
            return self.layers.index(block + 1)
        except ValueError:
            return None
