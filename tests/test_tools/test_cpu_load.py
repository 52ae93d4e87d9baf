"""The CPU load measure and the thread choice the demo makes with it (``analysis.timing``)."""

import os
import subprocess
import sys
import time

import pytest

from fatr_seg.analysis import timing as cpu_load
from fatr_seg.analysis.timing import busy_cpus, choose_threads


@pytest.fixture
def two_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


# Idle: both CPUs; one other busy process: the free CPU only; saturated: both, passive.
@pytest.mark.parametrize(
    "busy,threads",
    [(0.0, 2), (0.24, 2), (0.3, 1), (0.9, 1), (1.0, 1), (1.24, 1), (1.3, 2), (1.9, 2), (2.0, 2)],
)
def test_threads_follow_the_free_cpus(two_cpus, busy, threads):
    choice = choose_threads(busy=busy)
    assert choice.threads == threads and choice.cpus == 2 and choice.busy == busy
    assert f"{busy:.1f} of 2 CPUs busy with other processes" in choice.reason
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if threads > 1:  # threads that wait for each other sleep instead of spinning
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    assert choice.env() == env


def test_more_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(busy=1.0).threads == 7
    assert choose_threads(busy=2.6).threads == 5
    assert choose_threads(busy=7.2).threads == 1
    assert choose_threads(busy=8.0).threads == 8


def test_requests_win_over_the_load(two_cpus, monkeypatch):
    choice = choose_threads(requested=2, busy=2.0)
    assert choice.threads == 2 and "--threads" in choice.reason
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    choice = choose_threads(busy=2.0)
    assert choice.threads == 2 and "OMP_NUM_THREADS" in str(choice)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        choose_threads(requested=0)


def test_without_proc_stat_one_thread_per_cpu(two_cpus, monkeypatch):
    monkeypatch.setattr(cpu_load, "_cpu_times", lambda: None)
    assert busy_cpus(0.01) is None
    choice = choose_threads()
    assert choice.threads == 2 and choice.busy is None and "unknown" in choice.reason


def _cpu_seconds(pid):
    """User + system CPU seconds of a process, from ``/proc/PID/stat`` (the reference)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_busy_cpus_sees_a_busy_process():
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        before, t0 = _cpu_seconds(child.pid), time.monotonic()
        busy = busy_cpus(1.0)
        used = (_cpu_seconds(child.pid) - before) / (time.monotonic() - t0)
    finally:
        child.kill()
        child.wait()
    # At least what the child used (other processes may add to it), at most every CPU.
    assert used > 0.2, "the busy child hardly ran: the machine is too loaded to tell"
    assert used - 0.1 <= busy <= os.cpu_count() + 1e-9
