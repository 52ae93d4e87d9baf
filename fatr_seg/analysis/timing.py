"""Timing and memory measurement helpers (pure torch; no mmseg).

Runs of the models being compared alternate (A B A B ...) so that machine drift (thermal state,
other processes) hits all of them alike; each call is synchronised on CUDA. Statistics are the
median and the inter-quartile range, robust to the occasional slow outlier of a shared machine.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..layers.attention import AttnStats
from ..layers.vit import FATRVisionTransformer
from ..ops.scoring import hf_scores, topk_agreement, triton_available
from ..ops.select import num_keep

__all__ = [
    "TimingStats",
    "attention_stats_at",
    "cuda_peak_memory",
    "current_rss_bytes",
    "peak_rss_bytes",
    "peak_tensor_bytes",
    "reset_peak_rss",
    "synchronize",
    "time_alternating",
    "time_scoring_paths",
]


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on CUDA devices; no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, med, q3


@dataclass(frozen=True)
class TimingStats:
    """Summary of repeated wall-clock times of one call.

    Attributes:
        times_s: Every timed iteration, seconds, in run order.
        median_s: Median time.
        q1_s: First quartile.
        q3_s: Third quartile.
    """

    times_s: tuple[float, ...]
    median_s: float
    q1_s: float
    q3_s: float

    @classmethod
    def from_times(cls, times: list[float]) -> TimingStats:
        if not times:
            raise ValueError("no timed iterations: need at least one time")
        q1, med, q3 = _quartiles(sorted(times))
        return cls(tuple(times), med, q1, q3)

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    def throughput(self, batch: int) -> dict[str, float]:
        """Images/s of a batch of ``batch`` images: median, quartiles and IQR.

        The quartiles of images/s are those of the per-iteration throughputs ``batch / t``
        (so ``q1`` comes from the slow ``q3`` time).
        """
        ips = sorted(batch / t for t in self.times_s)
        q1, med, q3 = _quartiles(ips)
        return dict(median=med, q1=q1, q3=q3, iqr=q3 - q1)

    def to_dict(self, batch: int) -> dict[str, Any]:
        return dict(
            iters=len(self.times_s),
            median_s=self.median_s,
            q1_s=self.q1_s,
            q3_s=self.q3_s,
            iqr_s=self.iqr_s,
            images_per_s=self.throughput(batch),
            times_s=list(self.times_s),
        )


def time_alternating(
    fns: Mapping[str, Callable[[], Any]],
    iters: int,
    warmup: int,
    device: torch.device | str = "cpu",
    on_round: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time several zero-argument callables in alternation.

    Each round calls every function once, in the order given (A B A B ...). ``warmup`` rounds
    run first and are not recorded. Each call is timed alone, between two synchronisations,
    by ``clock`` (wall time; ``time.thread_time`` gives the calling thread's CPU time, which
    other processes taking the core do not inflate: for one-thread CPU runs on a shared machine).

    Args:
        fns: Name -> callable.
        iters: Timed rounds, >= 1.
        warmup: Untimed rounds first, >= 0.
        device: Device to synchronise.
        on_round: Called after every round (warm-up included) with ``'warmup'`` or ``'timed'``
            (e.g. to advance a progress bar).

    Returns:
        Name -> list of ``iters`` times in seconds.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not fns:
        raise ValueError("nothing to time: fns is empty")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + iters):
        for name, fn in fns.items():
            synchronize(device)
            t0 = clock()
            fn()
            synchronize(device)
            if r >= warmup:
                times[name].append(clock() - t0)
        if on_round is not None:
            on_round("warmup" if r < warmup else "timed")
    return times


def current_rss_bytes() -> int:
    """Resident set size of this process now, bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import psutil

        return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux ``/proc/self/clear_refs``); True if it worked.

    After a reset, :func:`peak_rss_bytes` reports the peak since the reset, so a memory probe
    measures the forward pass, not the model construction before it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _vm_hwm() is not None


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, bytes (since the last :func:`reset_peak_rss`)."""
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Peak CPU tensor memory allocated during one call of ``fn``, above what was allocated before.

    The CPU counterpart of ``torch.cuda.max_memory_allocated``: the running total of live tensor
    bytes from torch.profiler's allocation records (``profile_memory=True``), so unlike peak RSS
    it does not include memory the C allocator keeps after a free, nor depend on fragmentation.
    The profiler slows the call down; use it for memory, never for time.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    ]
    return max([0, *totals])


def cuda_peak_memory(fn: Callable[[], Any], device: torch.device | str) -> dict[str, int]:
    """Peak CUDA memory of one call of ``fn``.

    Returns:
        ``peak_bytes`` (``torch.cuda.max_memory_allocated`` during the call), ``before_bytes``
        (allocated before it: weights, inputs) and ``forward_bytes`` (their difference).
    """
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return dict(peak_bytes=peak, before_bytes=before, forward_bytes=peak - before)


@torch.no_grad()
def attention_stats_at(
    vit: FATRVisionTransformer, x: torch.Tensor, layer: int
) -> tuple[AttnStats, torch.Tensor]:
    """Queries, keys and log-sum-exp of the attention of 1-indexed block ``layer`` on images ``x``.

    Runs the trunk up to that block as its forward does (earlier reductions included) and
    returns the block's :class:`AttnStats` and its value tensor, (B, h, n, d).
    """
    if not 1 <= layer <= len(vit.blocks):
        raise ValueError(f"layer must be in [1, {len(vit.blocks)}], got {layer}")
    tokens, state = vit.embed(x)
    for blk in vit.blocks[: layer - 1]:
        tokens, state, _ = blk(tokens, state)
    attn = vit.blocks[layer - 1].attn
    h = vit.blocks[layer - 1].norm1(tokens)
    _, stats = attn(h, state.key_bias(torch.float32), state.num_dc, return_stats=True)
    B, n, C = h.shape
    v = attn.qkv(h).reshape(B, n, 3, attn.num_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
    return stats, v


def time_scoring_paths(
    stats: AttnStats,
    v: torch.Tensor,
    keep_ratio: float,
    iters: int,
    warmup: int,
    use_triton: bool | None = None,
) -> dict[str, Any]:
    """Time the HF-scoring paths on one block's activations and compare their top-k.

    Paths (all through :func:`fatr_seg.ops.hf_scores`):

    * ``exact_chunked_lse``: exact score reusing the fused kernel's row log-sum-exp (what the
      model runs on CPU);
    * ``exact_chunked``: exact score with its own row normalisation (what runs where the
      kernel exposes no log-sum-exp);
    * ``exact_triton``: the Triton kernel (CUDA, or ``use_triton=True`` under
      ``TRITON_INTERPRET=1``);
    * ``logit_proxy``: the paper's pre-softmax proxy.

    The fused attention call itself (``attention``) is timed beside them for scale.

    Args:
        stats: Attention statistics of the block (q, k, scale, lse).
        v: Values of the same attention, (B, h, n, d).
        keep_ratio: Keep ratio of the reduction; sets k of the top-k agreement.
        iters: Timed rounds.
        warmup: Untimed rounds.
        use_triton: Time the Triton path; None: only for CUDA tensors with Triton importable.

    Returns:
        ``{'times': {path: TimingStats}, 'topk_agreement': {...}, 'k': int,
        'num_patches': int, 'max_abs_diff': {path: float}}``. Scores are compared on patch
        tokens only (CLS excluded), as the reducer uses them.
    """
    q, k, scale, lse = stats.q, stats.k, stats.scale, stats.lse
    device = q.device
    if use_triton is None:
        use_triton = q.is_cuda and triton_available()
    M = q.shape[2] - 1  # patch tokens at the first reduction: all but CLS
    paths: dict[str, Callable[[], torch.Tensor]] = {
        "attention": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
        "exact_chunked": lambda: hf_scores(q, k, scale, "exact", backend="chunked"),
        "logit_proxy": lambda: hf_scores(q, k, scale, "logit_proxy"),
    }
    if lse is not None:
        paths["exact_chunked_lse"] = lambda: hf_scores(
            q, k, scale, "exact", backend="chunked", lse=lse
        )
    if use_triton:
        paths["exact_triton"] = lambda: hf_scores(q, k, scale, "exact", backend="triton")
    with torch.inference_mode():
        times = time_alternating(paths, iters, warmup, device)
        ref = hf_scores(q, k, scale, "exact", backend="chunked")[:, 1 : 1 + M]
        keep = num_keep(keep_ratio, M)
        agreement, diffs = {}, {}
        for name, fn in paths.items():
            if name == "attention":
                continue
            s = fn()[:, 1 : 1 + M]
            agreement[name] = topk_agreement(ref, s, keep)
            if name != "logit_proxy":
                diffs[name] = (s - ref).abs().max().item()
    return dict(
        times={name: TimingStats.from_times(t) for name, t in times.items()},
        topk_agreement=agreement,
        k=keep,
        num_patches=M,
        max_abs_diff=diffs,
    )
