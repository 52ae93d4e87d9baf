"""How many CPU threads a job should start with: the CPUs that other processes leave free.

On a small machine shared with other jobs, torch's default (one OpenMP thread per core) is a trap:
every parallel op waits for all its threads, and a thread that shares its core with another busy
process is scheduled late, so each op runs at the pace of the slowest core. The demo's training
step (ViT-T, batch 16 of 192²) took several times longer with 2 threads than with 1 on a 2-core
machine with other busy processes (``docs/history/benchmarks-2026-11.md``, "Threads under load").

:func:`busy_cpus` measures the load from ``/proc/stat`` over a short interval (the load average
lags by minutes and counts the caller's own work that just ended); :func:`choose_threads` turns it
into a thread count and the reason for it. The choice is handed to a child process through the
environment (:meth:`ThreadChoice.env`), which OpenMP reads when torch starts.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

__all__ = ["ThreadChoice", "busy_cpus", "choose_threads"]

# A CPU counts as free for a thread when at most this much of it is busy: two threads on two
# cores are only worth it on a nearly idle machine, because the busier core paces every op.
MAX_BUSY_PER_THREAD = 0.25


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
    """How many CPUs were busy (all processes together) over the next ``interval`` seconds.

    Returns:
        A number between 0 and the machine's CPU count (``os.cpu_count()``), or None where
        ``/proc/stat`` cannot be read (not Linux).
    """
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
    """A thread count for a job, and why.

    Attributes:
        threads: Intra-op threads (``OMP_NUM_THREADS``).
        cpus: CPUs this process may run on.
        busy: CPUs busy with other processes when measured (None: not measured).
        reason: One line saying why.
    """

    threads: int
    cpus: int
    busy: float | None
    reason: str

    def env(self) -> dict[str, str]:
        """Environment variables that make a child process's torch use :attr:`threads`.

        With more than one thread, ``OMP_WAIT_POLICY=PASSIVE`` too: a thread that reaches the
        end of a parallel op first then sleeps instead of spinning, so load that appears while
        the job runs slows it down instead of stalling it (measured in
        ``docs/history/benchmarks-2026-11.md``).
        """
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
    """Threads for a CPU job started now: one per CPU that other processes leave free.

    When none is free (the machine is saturated), one per CPU again: the threads then get a fair
    share of every CPU instead of one thread's share, and with ``OMP_WAIT_POLICY=PASSIVE``
    (:meth:`ThreadChoice.env`) a thread waiting for a descheduled partner sleeps instead of
    spinning. On the 2-core machine, saturated by other jobs, the demo's training step ran at a
    median 1.5 to 2.5 s with 2 passive threads, 1.9 to 4.5 s with 1 thread and 11 to 25 s with
    torch's default (2 spinning threads): ``docs/history/benchmarks-2026-11.md``, "Threads under
    load".

    Args:
        requested: A count the user asked for (e.g. ``--threads``); taken as is. Otherwise
            ``OMP_NUM_THREADS`` from the environment is taken as is when set.
        busy: CPUs busy with other processes; measured with :func:`busy_cpus` over
            ``interval`` seconds when None. Call it while none of the caller's own work runs.
        interval: Measuring time in seconds.

    Returns:
        ``floor(cpus - busy + MAX_BUSY_PER_THREAD)`` (a CPU counts as free when less than a
        quarter of it is busy), or all usable CPUs when that is 0.
    """
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
