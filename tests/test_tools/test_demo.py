"""``tools/demo.py`` (the steps in ``fatr_seg.analysis.demo``): the summary and its parsers
(``fatr_seg.analysis.demo_report``), and ``--quick`` end to end."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from fatr_seg.analysis import demo as steps
from fatr_seg.analysis import demo_report as report

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("fatr_demo_tool", REPO / "tools" / "demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

BASE, FATR = "configs/baseline_ade20k_demo.py", "configs/fatr_ade20k_demo.py"

# The tail of a real ``tools/test.py`` log (mmseg's IoUMetric table), trimmed.
TEST_LOG = """\
11/23 04:40:01 - mmengine - INFO - per class results:
11/23 04:40:01 - mmengine - INFO -
+------------------+-------+-------+
|      Class       |  IoU  |  Acc  |
+------------------+-------+-------+
|    background    | 81.25 | 90.02 |
|  stripes_fine_h  |  47.5 | 60.11 |
|       line       |  nan  |  nan  |
+------------------+-------+-------+
11/23 04:40:01 - mmengine - INFO - Iter(test) [4/4]    aAcc: 85.0100  mIoU: 64.3800  mAcc: 75.0700
"""


def _results(**extra):
    results = dict(
        fatr_config=FATR, baseline_config=BASE, num_train=600, num_val=100, size=384,
        max_iters=800, device="test cpu", timings={"data": 1.5, "train fatr": 10.0},
        miou={FATR: {"mIoU": 64.38, "aAcc": 85.01, "per_class": {"background": 81.25}}},
    )  # fmt: skip
    results.update(extra)
    return results


def test_read_test_metrics_and_per_class(tmp_path):
    run = tmp_path / "20260101_000000"
    run.mkdir()
    (run / "20260101_000000.log").write_text(TEST_LOG)
    metrics = {"aAcc": 85.01, "mIoU": 64.38, "mAcc": 75.07, "data_time": 0.01, "time": 0.2}
    (run / "20260101_000000.json").write_text(json.dumps(metrics) + "\n")
    out = report.read_test_metrics(str(tmp_path))
    assert out["mIoU"] == 64.38 and out["aAcc"] == 85.01 and out["mAcc"] == 75.07
    assert list(out["per_class"]) == ["background", "stripes_fine_h", "line"]
    assert out["per_class"]["background"] == 81.25 and out["per_class"]["stripes_fine_h"] == 47.5
    assert math.isnan(out["per_class"]["line"])


def test_read_test_metrics_without_run_fails_clearly(tmp_path):
    with pytest.raises(report.DemoError, match="no metrics"):
        report.read_test_metrics(str(tmp_path))


def test_summary_with_costs_has_ratios():
    bench = {"gmacs": {BASE: 2.0, FATR: 1.3}, "throughput": {BASE: 4.0, FATR: 5.0}}
    text = report.format_summary(_results(bench=bench, pictures=["work/tokens_overview.png"]))
    rows = [s for s in text.splitlines() if s.startswith("| ")]
    assert "| FATR | `configs/fatr_ade20k_demo.py` | 64.38 | 1.300 | 5.00 |" in rows
    assert "| baseline (no reduction) | `configs/baseline_ade20k_demo.py` | not trained | 2.000 " \
           "| 4.00 |" in rows  # fmt: skip
    assert "- FATR / baseline GMACs: 0.65x" in text
    assert "- FATR / baseline images/s: 1.25x" in text
    assert "![tokens_overview.png](tokens_overview.png)" in text
    assert "| **total (wall clock, start-up included)** | **11.5** |" in text
    assert "background 81.2" in text


def test_summary_without_benchmark_says_na_and_baseline_delta():
    miou = {FATR: {"mIoU": 60.0}, BASE: {"mIoU": 62.5}}
    text = report.format_summary(_results(miou=miou))
    assert "- FATR / baseline GMACs: n/a" in text
    assert "- FATR - baseline mIoU: -2.50 points" in text


def test_read_gmacs_follows_get_flops_schema(tmp_path):
    path = tmp_path / "flops.json"
    models = [
        {"config": BASE, "segmentor": {"macs": 2_000_000_000, "gmacs": 2.0}},
        {"config": "./" + FATR, "segmentor": {"macs": 1_300_000_000, "gmacs": 1.3}},
    ]
    path.write_text(json.dumps({"schema": "fatr_seg.get_flops/1", "models": models}))
    assert report.read_gmacs(str(path), [BASE, FATR]) == {BASE: 2.0, FATR: 1.3}
    path.write_text(json.dumps({"schema": "fatr_seg.get_flops/1", "models": models[:1]}))
    with pytest.raises(report.DemoError, match="MACs of configs/fatr_ade20k_demo.py"):
        report.read_gmacs(str(path), [BASE, FATR])


def test_read_throughput_follows_benchmark_schema(tmp_path):
    path = tmp_path / "benchmark.json"
    data = {
        "schema": "fatr_seg.benchmark/1",
        "configs": [{"name": "base", "path": BASE}, {"name": "fatr", "path": FATR}],
        "timing": [
            {"config": "base", "target": "backbone", "images_per_s": {"median": 9.0}},
            {"config": "base", "target": "segmentor", "images_per_s": {"median": 3.0}},
            {"config": "fatr", "target": "segmentor", "images_per_s": {"median": 4.5}},
        ],
        "skipped": [],
    }
    path.write_text(json.dumps(data))
    assert report.read_throughput(str(path), [BASE, FATR]) == {BASE: 3.0, FATR: 4.5}
    data["timing"].pop()
    data["skipped"] = [{"reason": "estimated 400 s > 300 s"}]
    path.write_text(json.dumps(data))
    with pytest.raises(report.DemoError, match="skipped: estimated 400 s"):
        report.read_throughput(str(path), [BASE, FATR])


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    work = tmp_path / "demo"
    results = demo.main(["--quick", "--work-dir", str(work), "--data-root", str(tmp_path / "d")])
    summary = (work / "summary.md").read_text()
    assert summary in capsys.readouterr().out
    miou = results["miou"][FATR]["mIoU"]
    assert isinstance(miou, float) and 0.0 <= miou <= 100.0
    assert f"| FATR | `{FATR}` | {miou:.2f} |" in summary
    assert (work / "tokens_overview.png").is_file()
    assert set(results["timings"]) >= {"data", "train fatr", "test fatr", "benchmark", "token maps"}
    if (REPO / "tools" / "benchmark.py").is_file() and (REPO / "tools" / "get_flops.py").is_file():
        gmacs = results["bench"]["gmacs"]
        assert 0 < gmacs[FATR] < gmacs[BASE]
        assert all(v > 0 for v in results["bench"]["throughput"].values())


def test_missing_config_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="config not found"):
        demo.main(["--config", str(tmp_path / "nope.py"), "--work-dir", str(tmp_path)])


def test_skip_train_without_checkpoint_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(steps, "step_data", lambda args: None)
    with pytest.raises(SystemExit, match="no checkpoint in"):
        demo.main(["--skip-train", "--work-dir", str(tmp_path)])


TRAIN_LOG = """\
11/30 05:21:37 - mmengine - INFO - Iter(train) [ 20/300]  lr: 1.0e-05  eta: 0:09:07  time: 3.9864  data_time: 0.0233  loss: 2.1553
11/30 05:21:39 - mmengine - INFO - Iter(train) [ 40/300]  lr: 3.0e-05  eta: 0:08:03  time: 2.0825  data_time: 0.0263  loss: 2.1483
11/30 05:21:41 - mmengine - INFO - Iter(train) [ 60/300]  lr: 5.0e-05  eta: 0:07:00  time: 2.0326  data_time: 0.0278  loss: 2.1341
11/30 05:21:43 - mmengine - INFO - Iter(train) [ 80/300]  lr: 5.0e-05  eta: 0:07:00  time: 1.5000  data_time: 0.0278  loss: 2.1341
11/30 05:21:44 - mmengine - INFO - Iter(test) [4/4]    aAcc: 85.0100  mIoU: 64.3800  time: 9.0
"""  # noqa: E501


def test_read_train_speed_is_the_median_after_start_up(tmp_path):
    path = tmp_path / "train.log"
    path.write_text(TRAIN_LOG)
    assert report.read_train_speed(str(path)) == 2.0326  # median of 2.0825, 2.0326, 1.5
    assert report.read_train_speed(str(path), skip=0) == pytest.approx((2.0825 + 2.0326) / 2)
    assert report.read_train_speed(str(tmp_path / "missing.log")) is None


def test_summary_names_threads_and_training_speed():
    text = report.format_summary(_results(
        threads={"train fatr": "1 thread (1.0 of 2 CPUs busy with other processes)"},
        train_speed={FATR: 1.25, BASE: 1.5}))  # fmt: skip
    assert "- training, median s/iteration: baseline 1.50, FATR 1.25" in text
    assert "- train fatr: 1 thread (1.0 of 2 CPUs busy with other processes)" in text


def test_tools_run_with_the_chosen_threads(tmp_path):
    """The thread count reaches torch in the tool's process (OpenMP reads it at start)."""
    log_path = tmp_path / "logs" / "threads.log"
    cmd = [sys.executable, "-c", "import torch; print('threads', torch.get_num_threads())"]
    steps.run_tool(cmd, str(log_path), env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert "threads 1" in log_path.read_text()
    with pytest.raises(report.DemoError, match=r"exited with 3: bad \(full log: "):
        steps.run_tool([sys.executable, "-c", "print('bad'); raise SystemExit(3)"], str(log_path))


def test_baseline_is_trained_by_default():
    assert demo.parse_args([]).train_baseline
    assert demo.parse_args(["--train-baseline"]).train_baseline
    assert not demo.parse_args(["--no-train-baseline"]).train_baseline
    assert demo.parse_args(["--threads", "1"]).threads == 1
    with pytest.raises(SystemExit):
        demo.parse_args(["--threads", "0"])
