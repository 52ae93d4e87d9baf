"""``tools/benchmark.py``, ``fatr_seg.analysis.benchmark*`` and the timing helpers in
``fatr_seg.analysis.timing``.

Nothing here asserts a speed: timings on a shared CI machine are noise. The tests check that the
benchmark measures what it says (alternation, every call timed, statistics, memory probes in a
child process) and that quick mode writes a valid JSON, table and plot.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fatr_seg.analysis import TimingStats, time_alternating
from fatr_seg.analysis.benchmark import Budget, benchmark
from fatr_seg.analysis.benchmark_report import to_markdown

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "fatr_benchmark_tool", REPO / "tools" / "benchmark.py"
)
benchmark_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark_tool)


def test_time_alternating_alternates_and_times_every_call():
    calls = []

    def make(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)

        return fn

    times = time_alternating({"a": make("a", 0.002), "b": make("b", 0.02)}, iters=3, warmup=2)
    assert calls == ["a", "b"] * 5  # warm-up rounds included, strictly alternating
    assert [len(t) for t in times.values()] == [3, 3]
    assert min(times["a"]) >= 0.002 and min(times["b"]) >= 0.02
    assert min(times["b"]) > max(times["a"])
    with pytest.raises(ValueError, match="iters"):
        time_alternating({"a": make("a", 0)}, iters=0, warmup=0)
    with pytest.raises(ValueError, match="empty"):
        time_alternating({}, iters=1, warmup=0)


def test_timing_stats_median_iqr_and_throughput():
    s = TimingStats.from_times([0.5, 0.1, 0.4, 0.2, 0.3])
    assert (s.median_s, s.q1_s, s.q3_s) == pytest.approx((0.3, 0.2, 0.4))
    assert s.iqr_s == pytest.approx(0.2)
    ips = s.throughput(batch=2)  # per-iteration 2 / t: 4, 5, 20/3, 10, 20
    assert ips["median"] == pytest.approx(2 / 0.3)
    assert (ips["q1"], ips["q3"]) == pytest.approx((5.0, 10.0))
    row = s.to_dict(batch=2)
    assert row["iters"] == 5 and row["times_s"] == [0.5, 0.1, 0.4, 0.2, 0.3]
    with pytest.raises(ValueError, match="no timed"):
        TimingStats.from_times([])


def test_peak_rss_sees_an_allocation():
    # In a fresh process: a long-lived pytest process may serve the block from memory that is
    # already resident (allocator free lists), which is exactly why probes run in children.
    code = (
        "import sys, torch\n"
        "from fatr_seg.analysis.timing import current_rss_bytes, peak_rss_bytes, reset_peak_rss\n"
        "if not reset_peak_rss(): sys.exit(3)\n"
        "before = current_rss_bytes()\n"
        "block = torch.ones(64 * 2**20 // 4)\n"
        "peak = peak_rss_bytes()\n"
        "print(peak - before)\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode == 3:
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) >= 60 * 2**20


def test_peak_tensor_bytes_is_the_exact_live_peak():
    from fatr_seg.analysis.timing import peak_tensor_bytes

    def fn():
        a = torch.empty(2**20)  # 4 MiB
        b = torch.empty(2**21)  # 8 MiB, with a alive: 12 MiB
        del a
        c = torch.empty(2**20)  # 4 MiB, with b alive: 12 MiB again, never more
        d = torch.empty(3 * 2**19)  # 6 MiB: b + c + d = 18 MiB, the peak
        del b, c, d

    assert peak_tensor_bytes(fn) == 18 * 2**20
    keep = torch.empty(2**22)  # allocated before the call: not counted
    assert peak_tensor_bytes(lambda: torch.empty(2**18)) == 2**20
    del keep


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        benchmark_tool.parse_args(["--device", "cpu", "--dtypes", "float16"])
    assert "float32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark_tool.parse_args(["configs/missing.py", "--device", "cpu"])
    assert "config not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark_tool.parse_args(["--shapes", "512x", "--device", "cpu"])
    assert "shape" in capsys.readouterr().err
    args = benchmark_tool.parse_args(["--device", "cpu", "--shapes", "384", "256x320"])
    assert args.shapes == [(384, 384), (256, 320)]
    assert args.batch_sizes == [1, 8] and args.dtypes == ["float32"] and args.iters >= 10


BASE, FATR = "configs/baseline_vit-s_ade20k.py", "configs/fatr_ade20k.py"
NAMES = ["baseline_vit-s_ade20k", "fatr_ade20k@keep0.5", "fatr_ade20k@keep0.9,0.8,0.7"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``tools/benchmark.py --quick`` run as a user starts it, timing every target (the
    training step too) of the baseline and FATR at two budgets (``--keep-ratio``), and probing
    the memory of each one's training step."""
    out = tmp_path_factory.mktemp("bench") / "bench"
    cmd = [sys.executable, str(REPO / "tools" / "benchmark.py"), BASE, FATR, "--quick",
           "--device", "cpu", "--no-progress", "--targets", "backbone", "segmentor", "train",
           "--memory-targets", "train", "--keep-ratio", "0.5", "0.9,0.8,0.7",
           "--out-dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "benchmark.json").read_text()), out


@pytest.mark.slow
def test_quick_mode_writes_json_markdown_and_plot(quick_run):
    result, out = quick_run
    assert result["schema"] == "fatr_seg.benchmark/1"
    settings = result["settings"]
    assert settings["max_cell_seconds"] == 240.0 and settings["time_budget"] == 1500.0
    assert [c["name"] for c in result["configs"]] == NAMES and result["reference"] == NAMES[0]
    assert result["skipped"] == []

    cells = {(r["config"], r["target"], tuple(r["shape"]), r["batch"]) for r in result["timing"]}
    assert cells == {(n, t, (s, s), b) for n in NAMES for t in ("backbone", "segmentor", "train")
                     for s in (64, 128) for b in (1, 2)}  # fmt: skip
    for r in result["timing"]:
        assert r["iters"] == 2 and len(r["times_s"]) == 2 and len(r["warmup_s"]) == 1
        assert all(t > 0 for t in r["times_s"])
        assert r["images_per_s"]["q1"] <= r["images_per_s"]["median"] <= r["images_per_s"]["q3"]
        ref_row = next(q for q in result["timing"] if q["config"] == NAMES[0]
                       and (q["target"], q["shape"], q["batch"]) == (r["target"], r["shape"],
                                                                     r["batch"]))  # fmt: skip
        assert r["speedup"] == pytest.approx(ref_row["median_s"] / r["median_s"], rel=1e-12)
        assert r["tokens"] == (r["shape"][0] // 16) ** 2
        if r["target"] == "train":  # no MACs are counted for a training step
            assert r["macs_ratio"] is None and r["speedup_per_ideal"] is None
        else:
            assert 0 < r["macs_ratio"] <= 1.0

    macs = {(r["config"], r["shape"][0]): r for r in result["macs"]}
    assert macs[(NAMES[1], 128)]["backbone"] < macs[(NAMES[0], 128)]["backbone"]
    assert macs[(NAMES[1], 128)]["scoring"] > 0 and macs[(NAMES[0], 128)]["scoring"] == 0

    # One probe per model: the training step's (labels and backward in the child; the forward
    # of every target is timed above).
    assert {(r["config"], r["target"]) for r in result["memory"]} == {(n, "train") for n in NAMES}
    for r in result["memory"]:
        assert r["error"] is None, r["error"]
        assert r["peak_bytes"] >= r["before_bytes"] > 0 and r["forward_bytes"] >= 0
        assert r["tensor_peak_bytes"] > 0

    markdown = (out / "benchmark.md").read_text()
    assert "## Throughput" in markdown and "## Peak memory" in markdown
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_run_times_one_model_per_budget(quick_run):
    """``--keep-ratio``: one row per budget, each with the MACs of its model."""
    from fatr_seg.analysis.benchmark_models import build_segmentor
    from fatr_seg.analysis.flops import count_macs

    result, _ = quick_run
    assert [c["reduction"] and c["reduction"]["keep_ratio"] for c in result["configs"]] == [
        None, [0.5, 0.5, 0.5], [0.9, 0.8, 0.7]]  # fmt: skip
    macs = {r["config"]: r["backbone"] for r in result["macs"] if r["shape"] == [64, 64]}
    x = torch.zeros(1, 3, 64, 64)
    for name, ratio in ((NAMES[1], 0.5), (NAMES[2], (0.9, 0.8, 0.7))):
        model, _, _ = build_segmentor(FATR, tiny=True)
        model.backbone.set_keep_ratio(ratio)
        assert macs[name] == count_macs(model.backbone, x).macs
    assert macs[NAMES[1]] < macs[NAMES[2]] < macs[NAMES[0]]


@pytest.mark.slow
def test_cell_over_budget_is_skipped_and_listed(tmp_path):
    # A budget of one microsecond: every cell is skipped after its warm-up, and says so.
    args = benchmark_tool.parse_args(
        [
            "--quick",
            "--device",
            "cpu",
            "--no-progress",
            "--no-memory",
            "--no-macs",
            "--shapes",
            "64",
            "--batch-sizes",
            "1",
            "--targets",
            "backbone",
            "--max-cell-seconds",
            "1e-6",
        ]
    )
    result = benchmark(args)
    assert result["timing"] == []
    (skip,) = result["skipped"]
    assert skip["kind"] == "timing" and skip["shape"] == [64, 64] and skip["batch"] == 1
    assert "--max-cell-seconds" in skip["reason"]
    assert "## Skipped" in to_markdown(result)


def test_budget_estimates_from_smaller_cells_and_names_the_limit():
    budget = Budget(cell_s=100, total_s=0)
    assert budget.estimate("float32", "backbone", (64, 64), batch=1, rounds=3) is None
    budget.per_image[("float32", "backbone", (64, 64))] = 1.0
    # Same shape, bigger batch: linear in the batch.
    assert budget.estimate("float32", "backbone", (64, 64), batch=4, rounds=3) == 12.0
    # A bigger shape: scaled by the reference's MACs.
    budget.macs = {("backbone", (64, 64)): 10, ("backbone", (128, 128)): 40}
    assert budget.estimate("float32", "backbone", (128, 128), batch=2, rounds=3) == 24.0
    assert budget.estimate("float32", "segmentor", (128, 128), batch=2, rounds=3) is None
    assert budget.reason(24.0) is None and budget.reason(None) is None
    assert "--max-cell-seconds 100" in budget.reason(101.0)
    total = Budget(cell_s=0, total_s=10)
    assert total.reason(5.0) is None
    assert "--time-budget 10" in total.reason(50.0)
