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

BASE, FATR = (
    "configs/demo/segmenter_vit-t_fcn_1xb8-200_synthetic-192x192.py",
    "configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py",
)
DISTILL = "configs/demo/fatr_vit-t_fcn_distill-1xb8-100_synthetic-192x192.py"
ROWS = [
    dict(key="baseline", label="baseline (no reduction)", config=BASE, checkpoint="b.pth"),
    dict(key="fatr_training_free", label="FATR training-free", config=FATR, checkpoint="b.pth"),
    dict(key="fatr_finetuned", label="FATR fine-tuned", config=FATR, checkpoint="f.pth"),
]

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
        fatr_config=FATR, baseline_config=BASE, distill_config=DISTILL, num_train=600,
        num_val=100, size=384, max_iters=200, finetune_iters=100, device="test cpu",
        timings={"data": 1.5, "train baseline": 10.0}, models=ROWS,
        miou={"baseline": {"mIoU": 62.5, "per_class": {"background": 90.0}},
              "fatr_training_free": {"mIoU": 60.0},
              "fatr_finetuned": {"mIoU": 64.38, "aAcc": 85.01,
                                 "per_class": {"background": 81.25}}},
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


def test_summary_has_the_three_rows_with_costs_and_ratios():
    bench = {"gmacs": {BASE: 2.0, FATR: 1.3}, "throughput": {BASE: 4.0, FATR: 5.0}}
    text = report.format_summary(_results(bench=bench, pictures=["work/tokens_overview.png"]))
    rows = [s for s in text.splitlines() if s.startswith("| ") and "---" not in s]
    assert rows[1:4] == [
        f"| baseline (no reduction) | `{BASE}` | trained from scratch, 200 iterations | 62.50 "
        "| 2.000 | 4.00 |",
        f"| FATR training-free | `{FATR}` | the baseline's weights, no training | 60.00 | 1.300 "
        "| 5.00 |",
        f"| FATR fine-tuned | `{FATR}` | the baseline's weights + 100 iterations of "
        f"self-distillation (`{DISTILL}`) | 64.38 | 1.300 | 5.00 |",
    ]
    assert "- FATR / baseline GMACs: 0.65x" in text
    assert "- FATR / baseline images/s: 1.25x" in text
    assert "- FATR training-free - baseline mIoU: -2.50 points" in text
    assert "- FATR fine-tuned - baseline mIoU: +1.88 points" in text
    assert "![tokens_overview.png](tokens_overview.png)" in text
    assert "| **total (wall clock, start-up included)** | **11.5** |" in text
    assert "FATR fine-tuned per-class IoU (%): background 81.2" in text
    assert "baseline (no reduction) per-class IoU (%): background 90.0" in text


def test_summary_without_benchmark_or_finetuning_says_na():
    results = _results(models=ROWS[:2], finetune_iters=None, distill_config=None)
    text = report.format_summary(results)
    assert "- FATR / baseline GMACs: n/a" in text
    assert "FATR fine-tuned" not in text
    assert (
        "| FATR training-free | `configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py` |"
        in text
    )


def test_read_gmacs_follows_get_flops_schema(tmp_path):
    path = tmp_path / "flops.json"
    models = [
        {"config": BASE, "segmentor": {"macs": 2_000_000_000, "gmacs": 2.0}},
        {"config": "./" + FATR, "segmentor": {"macs": 1_300_000_000, "gmacs": 1.3}},
    ]
    path.write_text(json.dumps({"schema": "fatr_seg.get_flops/1", "models": models}))
    assert report.read_gmacs(str(path), [BASE, FATR]) == {BASE: 2.0, FATR: 1.3}
    path.write_text(json.dumps({"schema": "fatr_seg.get_flops/1", "models": models[:1]}))
    with pytest.raises(
        report.DemoError, match="MACs of configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py"
    ):
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
    keys = [row["key"] for row in results["models"]]
    assert keys == ["baseline", "fatr_training_free", "fatr_finetuned"]
    for row in results["models"]:
        miou = results["miou"][row["key"]]["mIoU"]
        assert isinstance(miou, float) and 0.0 <= miou <= 100.0
        assert f"| {row['label']} | `{row['config']}` |" in summary
        assert f"| {miou:.2f} |" in summary
    base, free, tuned = (row["checkpoint"] for row in results["models"])
    assert free == base and Path(base).parent.name == "baseline"
    # tools/train.py (the baseline, 4 iterations): its checkpoint, and one loss logged per
    # iteration in mmengine's scalars.
    assert Path(base).name == "iter_4.pth"
    scalars = sorted(Path(base).parent.glob("*/vis_data/scalars.json"))[-1].read_text()
    losses = [r["loss"] for r in map(json.loads, scalars.splitlines()) if "loss" in r]
    assert len(losses) == 4 and all(0.0 < v < 100.0 for v in losses)
    assert results["train_speed"]["baseline"] > 0 and results["train_speed"]["fatr_finetune"] > 0
    # tools/test.py: mIoU, and mmseg's per-class table naming the 9 synthetic classes.
    from fatr_seg.datasets import CLASSES

    per_class = results["miou"]["baseline"]["per_class"]
    assert set(per_class) == set(CLASSES)
    assert all(v != v or 0.0 <= v <= 100.0 for v in per_class.values())  # NaN allowed
    assert Path(tuned).parent.name == "fatr_finetune" and Path(tuned).name == "iter_2.pth"
    # The FATR config loads the baseline's checkpoint cleanly: the hook's line, no mismatch.
    free_log = (work / "logs" / "test_fatr_training_free.log").read_text()
    assert "the checkpoint is the unreduced model's" in free_log
    assert "do not match" not in free_log and "missing keys" not in free_log
    # Fine-tuning was a distillation from the baseline, for 2 iterations.
    train_log = (work / "logs" / "train_fatr_finetune.log").read_text()
    assert f"loaded the distillation teacher from {base}" in train_log
    assert "loss_distill" in train_log and "Iter(train) [2/2]" in train_log
    # tools/visualize_tokens.py: per reduction layer the token map, prediction and ground truth
    # (96-px images enlarged to 320-px panels); the overview has every layer and both.
    from PIL import Image

    for name, panels in (("tokens_block2", 3), ("tokens_block5", 3), ("tokens_block8", 3),
                         ("tokens_overview", 5)):  # fmt: skip
        with Image.open(work / f"{name}.png") as png:
            png.verify()
            assert png.size == (panels * 320, 320 + 110), name
    assert list(results["timings"]) == [
        "data", "train baseline", "test baseline", "test fatr_training_free", "fine-tune FATR",
        "test fatr_finetuned", "benchmark", "token maps",
    ]  # fmt: skip
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


def test_iteration_time_is_the_median_after_start_up(tmp_path):
    """The training speed the demo and the CamVid study read from mmengine's scalars.json."""
    from fatr_seg.analysis.timing import iteration_time

    path = tmp_path / "scalars.json"
    rows = [dict(loss=2.1, time=t, iter=i) for i, t in enumerate((3.9864, 2.0825, 2.0326, 1.5))]
    path.write_text("\n".join(map(json.dumps, [*rows, dict(mIoU=64.38, step=4)])) + "\n")
    assert iteration_time(str(path)) == 2.0326  # median of 2.0825, 2.0326, 1.5
    path.write_text(json.dumps(rows[0]) + "\n")
    assert iteration_time(str(path)) == 3.9864  # only the first: kept
    assert iteration_time(str(tmp_path / "missing.json")) is None


def test_summary_names_threads_and_training_speed():
    text = report.format_summary(_results(
        threads=1, train_speed={"baseline": 1.5, "fatr_finetune": 1.25}))  # fmt: skip
    assert ("- training, median s/iteration: baseline 1.50, FATR fine-tuning (student + "
            "teacher) 1.25") in text  # fmt: skip
    assert "- CPU threads of every tool: 1" in text
    text = report.format_summary(_results(threads=None))
    assert "- CPU threads of every tool: torch default, one per core" in text


def test_tools_run_with_the_given_threads(tmp_path):
    """The thread count reaches torch in the tool's process (OpenMP reads it at start)."""
    log_path = tmp_path / "logs" / "threads.log"
    cmd = [sys.executable, "-c", "import torch; print('threads', torch.get_num_threads())"]
    steps.run_tool(cmd, str(log_path), env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert "threads 1" in log_path.read_text()
    with pytest.raises(report.DemoError, match=r"exited with 3: bad \(full log: "):
        steps.run_tool([sys.executable, "-c", "print('bad'); raise SystemExit(3)"], str(log_path))


def test_finetuning_is_on_by_default_and_lengths_are_checked():
    assert demo.parse_args([]).finetune
    assert not demo.parse_args(["--no-finetune"]).finetune
    assert demo.parse_args(["--threads", "1"]).threads == 1
    quick = demo.parse_args(["--quick"])
    assert (quick.max_iters, quick.finetune_iters) == (4, 2)
    for bad in (["--threads", "0"], ["--max-iters", "0"], ["--finetune-iters", "-1"]):
        with pytest.raises(SystemExit):
            demo.parse_args(bad)


def test_schedule_options_follow_each_demo_config():
    """--max-iters / --finetune-iters stretch the schedule each config has, and the result is
    the schedule the config would have with that many iterations written in."""
    import argparse

    from mmengine.config import Config, DictAction

    parser = argparse.ArgumentParser()
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)  # as tools/train.py
    args = demo.parse_args(["--data-root", "d"])
    for config, iters in ((BASE, 60), (DISTILL, 30)):
        opts = steps.cfg_options(args, config, iters)
        assert "train_dataloader.dataset.data_root=d" in opts and "val_cfg=None" in opts
        cfg = Config.fromfile(str(REPO / config))
        cfg.merge_from_dict(parser.parse_args(["--cfg-options", *opts]).cfg_options)
        assert cfg.train_cfg.max_iters == iters and cfg.default_hooks.checkpoint.interval == iters
        assert max(int(s["end"]) for s in cfg.param_scheduler) == iters
    sched = Config.fromfile(str(REPO / DISTILL)).param_scheduler
    assert [s["type"] for s in sched] == ["CosineAnnealingLR"]
    opts = steps.cfg_options(args, DISTILL, 30)
    assert "param_scheduler.0.T_max=30" in opts
    opts = steps.cfg_options(args, BASE, 60)
    assert "param_scheduler.0.end=10" in opts and "param_scheduler.1.begin=10" in opts
    loaders = ("val_dataloader", "test_dataloader")
    assert steps.cfg_options(args) == [f"{loader}.dataset.data_root=d" for loader in loaders]
