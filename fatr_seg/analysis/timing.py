"""Timing, memory and thread-count helpers (pure torch; no mmseg).

Models compared run in alternation (A B A B ...) so that machine drift hits all alike;
statistics are the median and quartiles. :func:`choose_threads` gives a job the CPUs that other
processes leave free: on a small shared machine torch's one thread per core is a trap (each
parallel op waits for its slowest thread).
"""

from __future__ import annotations

import json
import math
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

__all__ = ["ThreadChoice", "TimingStats", "busy_cpus", "choose_threads", "cuda_peak_memory",
           "current_rss_bytes", "peak_rss_bytes", "peak_tensor_bytes", "reset_peak_rss",
           "synchronize", "time_alternating"]  # fmt: skip

# A CPU counts as free for a thread when at most this much of it is busy: two threads on two
# cores are only worth it on a nearly idle machine, because the busier core paces every op.
MAX_BUSY_PER_THREAD = 0.25


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


def _cpu_times() -> tuple[int, int] | None:
    """``(total, idle)`` jiffies of all CPUs since boot, or None without ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user/nice).
    values = values[:8]
    return sum(values), values[3] + (values[4] if len(values) > 4 else 0)


def busy_cpus(interval: float = 1.0) -> float | None:
    """How many CPUs were busy (all processes together) over the next ``interval`` seconds
    (0 to ``os.cpu_count()``), or None where ``/proc/stat`` cannot be read (not Linux)."""
    start = _cpu_times()
    if start is None:
        return None
    time.sleep(interval)
    end = _cpu_times()
    total = end[0] - start[0]
    if total <= 0:
        return None
    idle = end[1] - start[1]
    return max(0.0, (total - idle) / total) * (os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadChoice:
    """Intra-op ``threads`` for a job, the ``cpus`` it may run on, the CPUs ``busy`` with
    other processes when measured (None: not measured) and the ``reason`` in one line."""

    threads: int
    cpus: int
    busy: float | None
    reason: str

    def env(self) -> dict[str, str]:
        """Environment that makes a child's torch use :attr:`threads`; with several, passive
        waiting too, so that load appearing meanwhile slows the job instead of stalling it."""
        n = str(self.threads)
        env = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        if self.threads > 1:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        return env

    def __str__(self) -> str:
        return f"{self.threads} thread{'s' if self.threads > 1 else ''} ({self.reason})"


def choose_threads(
    requested: int | None = None, busy: float | None = None, interval: float = 1.0
) -> ThreadChoice:
    """Threads for a CPU job started now: one per CPU that other processes leave free, or one
    passive thread per CPU when none is (a fair share of every CPU: on a saturated 2-core machine
    the demo's training step took 1.5-2.5 s so, 11-25 s with torch's default).
    ``requested`` (``--threads``), else a set ``OMP_NUM_THREADS``, is taken as is; ``busy`` is
    measured over ``interval`` s when None."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = max(1, cpus or 1)
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        return ThreadChoice(requested, cpus, busy, "asked for with --threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return ThreadChoice(int(env), cpus, busy, "OMP_NUM_THREADS is set")
    if busy is None:
        busy = busy_cpus(interval)
    if busy is None:
        return ThreadChoice(cpus, cpus, None, "CPU load unknown (no /proc/stat): one per CPU")
    free = min(cpus, math.floor(cpus - busy + MAX_BUSY_PER_THREAD))
    reason = f"{busy:.1f} of {cpus} CPUs busy with other processes"
    if free < 1:
        reason += ": none free, one passive thread per CPU for a fair share"
        return ThreadChoice(cpus, cpus, busy, reason)
    if free < cpus:
        reason += f": {free} on the free CPU{'s' if free > 1 else ''} only"
    return ThreadChoice(free, cpus, busy, reason)
