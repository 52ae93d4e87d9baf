"""MAC counting that sees fused attention and the reduction's own overhead.

``torch.utils.flop_counter.FlopCounterMode`` knows the CUDA attention kernels but not the fused
CPU kernel that ``F.scaled_dot_product_attention`` runs on CPU, nor in-place matmuls such as
``baddbmm_``: without help, attention on CPU counts zero. :func:`flop_formulas` adds them and
:func:`count_macs` runs the counter with them.

Conventions (the paper's, fvcore's and mmengine's): MACs = FLOPs / 2 of matmul-like ops only
(linear, matmul, convolution, attention: ``n_q · n_k · (d + d_v)`` per head); elementwise ops
count zero. The reduction's overhead is counted where it happens (the exact HF score's
``n² · C``, the proxies' ``n · C``, one dot product per compared pair, the DC term's
``2 · n · D · C``); its ``scatter_add`` and ``gather`` move data and are reported apart. The
count does not depend on the device, so the tools count on CPU (a Triton launch is invisible to
a dispatch mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..layers.attention import Attention
from ..layers.config import ReductionConfig
from ..layers.reducer import TokenReducer
from ..ops.reduce import dc_window_ids
from ..ops.scoring import query_rows
from ..ops.windows import num_windows

__all__ = ["BlockTokens", "MacReport", "analytic_vit_macs", "attention_flops", "count_macs",
           "flop_formulas", "token_schedule"]  # fmt: skip

aten = torch.ops.aten

# Ops whose count is not arithmetic on MACs (adds, moved elements): reported apart.
_AUX_OPS = ("aten.scatter_add", "aten.gather")
# Plain attention is one fused op; batched matmuls inside an attention module are the DC term.
_BATCHED_MATMULS = ("aten.bmm", "aten.baddbmm", "aten.baddbmm_")


def attention_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """FLOPs of ``softmax(q kᵀ) v``, ``2 · B · h · n_q · n_k · (d + d_v)``, for q (B, h, n_q,
    d), k (B, h_kv, n_k, d) and v (B, h_kv, n_k, d_v) (``h_kv`` may divide ``h``: grouped)."""
    b, h, n_q, d = q_shape
    n_k, d_v = k_shape[-2], v_shape[-1]
    if k_shape[-1] != d or v_shape[-2] != n_k:
        raise ValueError(f"attention shapes disagree: q {q_shape}, k {k_shape}, v {v_shape}")
    return 2 * b * h * n_q * n_k * (d + d_v)


def _sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query_shape, key_shape, value_shape)


def _sdpa_backward(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    # As torch counts the CUDA kernels' backward: recompute q kᵀ, then dP = dO vᵀ, dV = Pᵀ dO,
    # dQ = dS k, dK = dSᵀ q.
    b, h, n_q, d = query_shape
    n_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * n_q * n_k * (3 * d + 2 * d_v)


def _mm_like(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    # baddbmm_(self, batch1 (b, m, k), batch2 (b, k, n)) and addbmm(_): 2·b·m·n·k; addmm_(self,
    # mat1 (m, k), mat2 (k, n)): 2·m·n·k.
    return 2 * math.prod(a_shape) * b_shape[-1]


def _index_count(self_shape, dim, index_shape, *args, out_shape=None, **kwargs) -> int:
    # scatter_add: one addition per index entry; gather: one moved element per output entry.
    return math.prod(index_shape)


def flop_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas ``FlopCounterMode`` lacks (its ``custom_mapping``): the fused CPU and
    backend-agnostic attention kernels (forward, backward), in-place and reduced batched
    matmuls, and ``scatter_add``/``gather``, which :class:`MacReport` keeps apart from the MACs."""
    mapping: dict[Any, Callable[..., int]] = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
        aten.baddbmm_: _mm_like,
        aten.addbmm: _mm_like,
        aten.addbmm_: _mm_like,
        aten.addmm_: _mm_like,
        aten.scatter_add: _index_count,
        aten.gather: _index_count,
    }
    for name, formula in (
        ("_scaled_dot_product_fused_attention_overrideable", _sdpa_forward),
        ("_scaled_dot_product_fused_attention_overrideable_backward", _sdpa_backward),
    ):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = formula
    return mapping


@dataclass(frozen=True)
class MacReport:
    """:func:`count_macs`'s result: ``macs`` of matmul-like ops, per op and per module path; of
    them ``scoring_macs`` inside :class:`TokenReducer` modules and ``dc_term_macs`` (batched matmuls
    inside :class:`Attention`); apart, the additions of ``scatter_add`` and the elements ``gather``
    moves."""

    macs: int
    by_op: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)
    scoring_macs: int = 0
    dc_term_macs: int = 0
    dc_aggregation_adds: int = 0
    moved_elements: int = 0

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (module attribution left out: it is long)."""
        return dict(macs=self.macs, gmacs=self.gmacs, by_op=dict(self.by_op),
                    scoring_macs=self.scoring_macs, dc_term_macs=self.dc_term_macs,
                    dc_aggregation_adds=self.dc_aggregation_adds,
                    moved_elements=self.moved_elements)  # fmt: skip


def _module_kinds(model: nn.Module) -> dict[str, str]:
    # Relative path -> 'reducer' / 'attention' for the modules whose MACs are overhead.
    kinds = {}
    for path, mod in model.named_modules():
        if isinstance(mod, TokenReducer):
            kinds[path] = "reducer"
        elif isinstance(mod, Attention):
            kinds[path] = "attention"
    return kinds


def _kind(tracker_key: str, kinds: dict[str, str]) -> str | None:
    # FlopCounterMode names a module "<RootClass>.<path>", the root being the first module it
    # saw run (the model itself, or a child when ``method`` calls children directly).
    if "." not in tracker_key:
        return None
    rel = tracker_key.split(".", 1)[1]
    for path, kind in kinds.items():
        if path == rel or path.endswith("." + rel):
            return kind
    return None


def count_macs(
    fn: Callable[..., Any], *inputs: Any, method: str | None = None, **kwargs: Any
) -> MacReport:
    """The :class:`MacReport` of one call ``fn(*inputs, **kwargs)`` under inference mode;
    ``fn``: a module (its ``forward``, or its ``method``, e.g. ``'encode_decode'``), or any
    callable."""
    call = getattr(fn, method) if method else fn
    kinds = _module_kinds(fn) if isinstance(fn, nn.Module) else {}
    counter = FlopCounterMode(display=False, custom_mapping=flop_formulas())
    with torch.inference_mode(), counter:
        call(*inputs, **kwargs)
    counts = {
        mod: {str(op): v for op, v in ops.items()} for mod, ops in counter.get_flop_counts().items()
    }
    glob = counts.get("Global", {})
    by_op = {op: v // 2 for op, v in glob.items() if op not in _AUX_OPS}
    by_module = {
        mod: sum(v for op, v in ops.items() if op not in _AUX_OPS) // 2
        for mod, ops in counts.items()
        if mod != "Global"
    }
    scoring = dc_term = 0
    for mod, ops in counts.items():
        kind = _kind(mod, kinds)
        if kind == "reducer":
            scoring += by_module[mod]
        elif kind == "attention":
            dc_term += sum(v for op, v in ops.items() if op in _BATCHED_MATMULS) // 2
    return MacReport(
        macs=sum(by_op.values()),
        by_op=by_op,
        by_module=by_module,
        scoring_macs=scoring,
        dc_term_macs=dc_term,
        dc_aggregation_adds=glob.get("aten.scatter_add", 0),
        moved_elements=glob.get("aten.gather", 0),
    )


@dataclass(frozen=True)
class BlockTokens:
    """Tokens (CLS included) entering one block's attention and MLP (after its reduction, if
    any), the DC tokens entering the attention, and whether the block reduces."""

    attn: int
    mlp: int
    dc: int
    reduces: bool


def token_schedule(
    grid: tuple[int, int], depth: int, reduction: dict | ReductionConfig | None
) -> list[BlockTokens]:
    """One :class:`BlockTokens` per block of a ViT of ``depth`` blocks on a patch ``grid`` reduced
    by ``reduction``, as :class:`TokenReducer` runs (data-independent)."""
    red = ReductionConfig.from_dict(reduction, depth=depth)
    M, D, dc_grid = grid[0] * grid[1], 0, None
    out = []
    for i in range(depth):
        j = red.index(i) if red else None
        attn = 1 + M + D
        if j is None:
            out.append(BlockTokens(attn, attn, D, False))
            continue
        keep = red.num_keep(j, M, grid)  # a local window layer is first: the grid is whole
        new_grid = red.dc_grid(j)
        if keep == M and (new_grid is None or D == 0 or new_grid == dc_grid):
            # The reducer leaves the sequence unchanged (nothing to fold, DC grid the same).
            out.append(BlockTokens(attn, attn, D, False))
            continue
        d_in = D
        if new_grid is not None:
            D, dc_grid = dc_window_ids(tuple(grid), new_grid)[1], new_grid
        M = keep + (1 if red.aggregate[j] == "fuse" else 0)
        out.append(BlockTokens(attn, 1 + M + D, d_in, True))
    return out


def _selection_macs(red: ReductionConfig, j: int, n: int, M: int, D: int, keep: int, dim: int,
                    heads: int, grid: tuple[int, int]) -> int:  # fmt: skip
    """MACs of reduction layer ``j``'s score and merge partners (n tokens: M patches, D DC)."""
    score = red.score[j]
    d_metric = dim // heads if red.metric == "keys" else dim
    rows = n  # query rows of the HF score: all, or the strided estimate's (CLS and patches)
    if red.score_queries is not None:
        rows = len(range(n - D)[query_rows(n - D, red.score_queries)])
    hf = rows * n * dim
    if score == "hf_bipartite" and red.num_protected(M, keep) == 0:
        score = "bipartite"  # nothing left to protect: the reducer computes no HF score
    macs = {"hf": hf, "hf_bipartite": hf, "window_hf": hf, "hf_proxy": n * dim,
            "cls": n * dim}.get(score, 0)  # fmt: skip
    exact_dc = score == "hf_proxy" or red.score_queries is None
    if score in ("hf", "hf_bipartite", "hf_proxy") and D and exact_dc:  # DC queries' logits
        macs += D * n * dim
    if score == "bipartite":
        macs += ((M + 1) // 2) * (M // 2) * d_metric
    elif score in ("hf_bipartite", "random_bipartite"):
        free = M - red.num_protected(M, keep)
        macs += ((free + 1) // 2) * (free // 2) * d_metric
    elif score == "window":
        s = red.local_window**2
        macs += num_windows(grid, red.local_window) * s * s * d_metric
    elif score in ("window_hf", "window_random"):
        pass  # the windows are fixed: no similarity is compared
    elif red.aggregate[j] == "merge":  # nearest kept token of every dropped one
        macs += (M - keep) * keep * d_metric
    return macs


def analytic_vit_macs(
    grid: tuple[int, int],
    dim: int,
    depth: int,
    patch_size: int,
    in_channels: int = 3,
    mlp_ratio: float = 4.0,
    reduction: dict | ReductionConfig | None = None,
    scoring: bool = True,
    dc_term: bool = True,
    num_heads: int = 6,
) -> int:
    """Closed-form MACs of :class:`fatr_seg.layers.FATRVisionTransformer` (one image, no head).

    Per block on ``n`` attention and ``m`` MLP tokens: ``4 · n · C² + 2 · n² · C + 2 · mlp_ratio ·
    m · C²`` (``12 · n · C² + 2 · n² · C`` for a plain ViT), plus the patch embedding. The
    reduction's scores and similarities (``scoring``) and the DC term (``dc_term``) as counted on
    CPU, where the fused kernel returns the row log-sum-exp."""
    red = ReductionConfig.from_dict(reduction, depth=depth)
    N = grid[0] * grid[1]
    hidden = int(dim * mlp_ratio)
    macs = N * patch_size * patch_size * in_channels * dim
    first = red.layers[0] - 1 if red else depth
    M = N
    for i, blk in enumerate(token_schedule(grid, depth, red)):
        n, m = blk.attn, blk.mlp
        macs += 4 * n * dim * dim + 2 * n * n * dim + 2 * m * dim * hidden
        j = red.index(i) if red else None
        if j is not None and blk.reduces:
            keep = red.num_keep(j, M, grid)
            if scoring:
                macs += _selection_macs(red, j, n, M, blk.dc, keep, dim, num_heads, grid)
            M = keep + (1 if red.aggregate[j] == "fuse" else 0)
        if dc_term and red and red.reweight is not None and i > first and blk.dc:
            macs += 2 * n * blk.dc * dim
    return macs
