"""Timing and memory helpers (pure torch; no mmseg).

Models compared run in alternation (A B A B ...) so that machine drift hits all alike;
statistics are the median and quartiles.
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

__all__ = ["TimingStats", "cuda_peak_memory", "current_rss_bytes", "iteration_time",
           "peak_rss_bytes", "peak_tensor_bytes", "reset_peak_rss", "synchronize",
           "time_alternating"]  # fmt: skip


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
    """Repeated times of one call (seconds, in run order), their median and quartiles."""

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
        """Images/s of ``batch`` images: median, quartiles and IQR of ``batch / t``."""
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
    """Name -> ``iters`` times (s) of zero-argument callables called in alternation (A B A B
    ...) after ``warmup`` unrecorded rounds, each call timed alone between two synchronisations of
    ``device`` by ``clock`` (``time.thread_time``: CPU time, which other processes do not inflate).
    ``on_round`` is called after every round with ``'warmup'`` or ``'timed'``."""
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


def iteration_time(scalars: str) -> float | None:
    """Median seconds per training iteration (the ``time`` an mmengine Runner logs in its
    ``vis_data/scalars.json``), the first (start-up) left out when more remain; None without."""
    if not os.path.isfile(scalars):
        return None
    with open(scalars) as f:
        times = [r["time"] for line in f if line.strip() and "time" in (r := json.loads(line))]
    times = times[1:] or times
    return statistics.median(times) if times else None


def current_rss_bytes() -> int:
    """Resident set size of this process now, bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import psutil

        return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux), so that :func:`peak_rss_bytes` measures the
    pass and not the model's construction; True if it did."""
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
    """Peak CPU tensor bytes allocated during one call of ``fn``, from torch.profiler's
    allocation records (CUDA's ``max_memory_allocated`` on CPU; unlike peak RSS it excludes what the
    C allocator keeps). The profiler slows the call: use it for memory, never for time."""
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
    """Peak CUDA memory of one call of ``fn``: ``peak_bytes`` (max_memory_allocated),
    ``before_bytes`` (weights, inputs) and ``forward_bytes`` (their difference)."""
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return dict(peak_bytes=peak, before_bytes=before, forward_bytes=peak - before)
