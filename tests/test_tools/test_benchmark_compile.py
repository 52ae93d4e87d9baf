"""``tools/benchmark.py --compile`` (compiled twins in the same alternation) and ``--cpu-time``."""

import functools
import importlib.util
import time
from pathlib import Path

import pytest
import torch

from fatr_seg.analysis.benchmark import benchmark
from fatr_seg.analysis.benchmark_report import to_markdown
from fatr_seg.analysis.timing import time_alternating

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("benchmark_tool", REPO / "tools" / "benchmark.py")
benchmark_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark_tool)


@pytest.mark.slow
def test_compiled_twins_are_timed_and_reported(monkeypatch):
    """The reporting of compiled twins. They compile with dynamo's eager backend here (inductor
    costs minutes on 2 cores): that inductor gives eager's outputs is checked for the backbone
    and ``encode_decode`` in test_compile_layers.py and test_compile.py."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    args = benchmark_tool.parse_args(["--quick", "--compile", "--no-memory",
                                      "--no-progress", "--shapes", "64", "--batch-sizes", "2",
                                      "--threads", "1"])  # fmt: skip
    result = benchmark(args)
    torch._dynamo.reset()
    assert result["settings"]["compile"] is True
    names = {"baseline_vit-s_ade20k", "fatr_ade20k"}
    for target in ("backbone", "segmentor"):
        rows = {r["config"]: r for r in result["timing"] if r["target"] == target}
        assert set(rows) == names | {n + "+compile" for n in names}
        for name, row in rows.items():
            compiled = name.endswith("+compile")
            assert row["compiled"] is compiled
            assert (row["compile_s"] > 0) if compiled else row["compile_s"] is None
            # The same-mode reference: eager vs eager baseline, compiled vs compiled baseline.
            ref = rows["baseline_vit-s_ade20k" + ("+compile" if compiled else "")]
            assert row["speedup_same_mode"] == pytest.approx(ref["median_s"] / row["median_s"])
        # Compiled twins have their model's MACs.
        assert rows["fatr_ade20k+compile"]["macs_ratio"] == rows["fatr_ade20k"]["macs_ratio"]
    assert "same-mode speed-up" in to_markdown(result)


def test_cpu_time_clock_ignores_time_off_the_core():
    """``--cpu-time`` times by the thread's CPU time: waiting (here: sleeping) does not count."""
    fns = {"sleep": lambda: time.sleep(0.05)}
    wall = time_alternating(fns, 2, 0)["sleep"]
    cpu = time_alternating(fns, 2, 0, clock=time.thread_time)["sleep"]
    assert min(wall) >= 0.05 and max(cpu) < 0.01


def test_cpu_time_needs_one_cpu_thread(capsys):
    with pytest.raises(SystemExit):
        benchmark_tool.parse_args(["--cpu-time", "--threads", "2", "--device", "cpu"])
    assert "--threads 1" in capsys.readouterr().err
    args = benchmark_tool.parse_args(["--cpu-time", "--threads", "1", "--device", "cpu"])
    assert args.cpu_time
