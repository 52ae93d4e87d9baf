"""The embedded default (``make demo``): data, training, mIoU, cost and token maps on a CPU.

``python tools/demo.py [--work-dir work_dirs/demo] [--skip-train] [--quick] [--train-baseline]``

1. generate the synthetic ADE20K-layout set if absent (``fatr_seg.datasets.write_dataset``);
2. train ``configs/fatr_ade20k_demo.py`` with ``tools/train.py``;
3. evaluate the last checkpoint with ``tools/test.py`` (mIoU);
4. measure baseline vs FATR: throughput (``tools/benchmark.py``) and MACs (``tools/get_flops.py``)
   at the demo resolution;
5. draw token maps with ``tools/visualize_tokens.py``;
6. write ``WORK_DIR/summary.md`` and print it.

Every tool runs as a subprocess; its full output goes to ``WORK_DIR/logs/STEP.log`` and only the
progress lines are echoed (``--verbose`` echoes everything). A failing step stops the demo with one
line naming the step and its log; benchmark tools that are missing are reported and skipped.
"""

import argparse
import contextlib
import glob
import json
import os
import os.path as osp
import platform
import re
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)

FATR_CONFIG = "configs/fatr_ade20k_demo.py"
BASELINE_CONFIG = "configs/baseline_ade20k_demo.py"
# Lines of the tools' output worth echoing: training/eval progress, results, errors.
PROGRESS = re.compile(
    r"Iter\((train|val|test)\)|mIoU|Saving checkpoint|per class results|^\|"
    r"|Error|error:|warning:|Traceback|^block \d+:|^wrote |img/s|GMACs|GFLOPs"
)
QUICK = dict(num_train=8, num_val=4, size=96, max_iters=4, bench_iters=2, bench_warmup=1)
# --quick also trains with batch 2 and loads data in the main process (fast start-up).
QUICK_OPTIONS = ["train_dataloader.batch_size=2"] + [
    f"{loader}.num_workers=0"
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader")
]


class DemoError(RuntimeError):
    """A step failed; the message is the one line shown to the user."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Run the embedded CPU demo end to end")
    parser.add_argument("--work-dir", default="work_dirs/demo", help="outputs and logs")
    parser.add_argument("--data-root", default="data/synthetic_ade", help="synthetic data root")
    parser.add_argument("--num-train", type=int, default=600, help="training images to generate")
    parser.add_argument("--num-val", type=int, default=100, help="validation images to generate")
    parser.add_argument("--size", type=int, default=384, help="generated image side (px)")
    parser.add_argument("--config", default=FATR_CONFIG, help="FATR demo config")
    parser.add_argument("--baseline-config", default=BASELINE_CONFIG, help="baseline config")
    parser.add_argument("--max-iters", type=int, help="override the training length")
    parser.add_argument("--skip-train", action="store_true",
                        help="reuse the last checkpoint in WORK_DIR/fatr")  # fmt: skip
    parser.add_argument(
        "--train-baseline",
        action="store_true",
        help="also train and evaluate the baseline (about doubles the time)",
    )
    parser.add_argument("--bench-iters", type=int, default=30, help="timed forward passes")
    parser.add_argument("--bench-warmup", type=int, default=5, help="untimed forward passes")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny data and a few iterations: checks the pipeline in a minute",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="passed on to train/test/visualize (mmengine --cfg-options)",
    )
    parser.add_argument("--verbose", action="store_true", help="echo the tools' full output")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_train, args.num_val, args.size = (
            QUICK["num_train"],
            QUICK["num_val"],
            QUICK["size"],
        )
        args.max_iters = args.max_iters or QUICK["max_iters"]
        args.bench_iters, args.bench_warmup = QUICK["bench_iters"], QUICK["bench_warmup"]
        args.cfg_options = QUICK_OPTIONS + list(args.cfg_options)
    return args


def log(msg):
    print(f"[demo] {msg}", flush=True)


def run_tool(cmd, log_path, verbose=False):
    """Run ``cmd`` from the repo root, log everything to ``log_path``, echo progress lines.

    Raises:
        DemoError: naming the command and the log when it exits non-zero.
    """
    os.makedirs(osp.dirname(log_path), exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONWARNINGS"] = env.get("PYTHONWARNINGS", "ignore::UserWarning")
    last = []
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
        for line in proc.stdout:
            f.write(line)
            last = (last + [line.rstrip()])[-15:]
            if verbose or PROGRESS.search(line):
                print("    " + line.rstrip()[:160], flush=True)
        code = proc.wait()
    if code != 0:
        reason = next((s for s in reversed(last) if s.strip()), "no output")
        raise DemoError(f"{osp.basename(cmd[1])} exited with {code}: {reason[:200]} "
                        f"(full log: {log_path})")  # fmt: skip
    return log_path


def _cfg_options(args, train=False):
    """``--cfg-options`` for the tools: the data root, and for training its length.

    Training skips mmengine's validation at the last iteration: step 3 runs ``tools/test.py``
    on the same images anyway.
    """
    if train:
        # The test loader stays configured (training neither reads nor checks it).
        opts = [f"train_dataloader.dataset.data_root={args.data_root}",
                f"test_dataloader.dataset.data_root={args.data_root}",
                "val_cfg=None", "val_dataloader=None", "val_evaluator=None"]  # fmt: skip
    else:
        opts = [f"{loader}.dataset.data_root={args.data_root}"
                for loader in ("val_dataloader", "test_dataloader")]  # fmt: skip
    if train and args.max_iters:
        n = args.max_iters
        # The demo configs' schedule: param_scheduler[0] warms up for 50 iterations (a sixth of
        # a shorter run), param_scheduler[1] decays from there to max_iters.
        warm = max(1, min(50, n // 6))
        opts += [f"train_cfg.max_iters={n}", f"default_hooks.checkpoint.interval={n}",
                 f"param_scheduler.0.end={warm}", f"param_scheduler.1.begin={warm}",
                 f"param_scheduler.1.end={max(n, warm + 1)}"]  # fmt: skip
    extra = list(args.cfg_options)
    if train:  # validation is switched off above: options for its loader would have no target
        extra = [o for o in extra if not o.startswith("val_")]
    return opts + extra


# --------------------------------------------------------------------------------------- steps


def step_data(args):
    from fatr_seg.datasets.synthetic import is_complete, write_dataset

    settings = dict(num_train=args.num_train, num_val=args.num_val, size=args.size, seed=0)
    size = (args.size, args.size)
    if is_complete(args.data_root, **dict(settings, size=size)):
        log(f"data: {args.data_root} already holds {args.num_train} + {args.num_val} images")
        return
    log(f"data: generating {args.num_train} + {args.num_val} images of {args.size}x{args.size} "
        f"into {args.data_root}")  # fmt: skip
    write_dataset(args.data_root, progress=True, force=True, **dict(settings, size=size))


def last_checkpoint(work_dir):
    """Path of the newest checkpoint mmengine saved in ``work_dir``."""
    pointer = osp.join(work_dir, "last_checkpoint")
    if osp.isfile(pointer):
        with open(pointer) as f:
            path = f.read().strip()
        if osp.isfile(path):
            return path
    ckpts = sorted(glob.glob(osp.join(work_dir, "*.pth")), key=osp.getmtime)
    if not ckpts:
        raise DemoError(f"no checkpoint in {work_dir} (train first, without --skip-train)")
    return ckpts[-1]


def step_train(args, config, name):
    work_dir = osp.join(args.work_dir, name)
    if args.skip_train:
        ckpt = last_checkpoint(work_dir)
        log(f"train ({name}): skipped, using {ckpt}")
        return ckpt
    cmd = [sys.executable, "tools/train.py", config, "--work-dir", work_dir]
    cmd += ["--cfg-options", *_cfg_options(args, train=True)]
    run_tool(cmd, osp.join(args.work_dir, "logs", f"train_{name}.log"), args.verbose)
    return last_checkpoint(work_dir)


def read_test_metrics(test_dir):
    """mIoU, aAcc, mAcc (%) and per-class IoU from the newest run of ``tools/test.py``.

    mmengine writes ``TEST_DIR/<timestamp>/<timestamp>.json`` (one line of metrics) and the
    per-class table to ``<timestamp>.log``.
    """
    runs = sorted(glob.glob(osp.join(test_dir, "*", "*.json")), key=osp.getmtime)
    if not runs:
        raise DemoError(f"tools/test.py wrote no metrics under {test_dir}")
    with open(runs[-1]) as f:
        lines = [json.loads(s) for s in f if s.strip()]
    metrics = next((m for m in reversed(lines) if "mIoU" in m), None)
    if metrics is None:
        raise DemoError(f"no mIoU in {runs[-1]}")
    result = {k: float(metrics[k]) for k in ("mIoU", "aAcc", "mAcc") if k in metrics}
    result["per_class"] = parse_per_class(runs[-1][: -len(".json")] + ".log")
    return result


def parse_per_class(log_path):
    """``{class: IoU}`` from the table mmseg's IoUMetric prints (empty if there is none)."""
    if not osp.isfile(log_path):
        return {}
    with open(log_path) as f:
        text = f.read()
    start = text.rfind("per class results:")
    if start < 0:
        return {}
    table = {}
    for line in text[start:].splitlines()[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0] != "Class":
            try:
                table[cells[0]] = float(cells[1])
            except ValueError:
                continue
        elif table and not line.startswith(("+", "|")):
            break
    return table


def step_test(args, config, ckpt, name):
    test_dir = osp.join(args.work_dir, f"{name}_test")
    cmd = [sys.executable, "tools/test.py", config, ckpt, "--work-dir", test_dir]
    cmd += ["--cfg-options", *_cfg_options(args)]
    run_tool(cmd, osp.join(args.work_dir, "logs", f"test_{name}.log"), args.verbose)
    metrics = read_test_metrics(test_dir)
    log(f"test ({name}): mIoU {metrics['mIoU']:.2f} %")
    return metrics


def step_benchmark(args):
    """Images/s (``tools/benchmark.py``) and GMACs (``tools/get_flops.py``) of both configs.

    A tool that is not there is reported and its numbers are left out of the summary.
    """
    out = {}
    bench_dir = osp.join(args.work_dir, "benchmark")
    configs = [args.baseline_config, args.config]
    if osp.isfile(osp.join(REPO, "tools/get_flops.py")):
        path = osp.join(bench_dir, "flops.json")
        cmd = [sys.executable, "tools/get_flops.py", *configs,
               "--shape", str(args.size), str(args.size), "--json", path]  # fmt: skip
        run_tool(cmd, osp.join(args.work_dir, "logs", "flops.log"), args.verbose)
        out["gmacs"] = read_gmacs(path, configs)
    else:
        log("benchmark: tools/get_flops.py is missing: GMACs left out")
    if osp.isfile(osp.join(REPO, "tools/benchmark.py")):
        # Throughput only: MACs come from get_flops, memory probes and scoring paths are
        # separate studies (see docs) that would double this step's time.
        cmd = [sys.executable, "tools/benchmark.py", *configs, "--shapes", str(args.size),
               "--batch-sizes", "1", "--iters", str(args.bench_iters),
               "--warmup", str(args.bench_warmup), "--targets", "segmentor", "--device", "cpu",
               "--no-memory", "--no-scoring", "--no-macs", "--no-progress",
               "--out-dir", bench_dir]  # fmt: skip
        run_tool(cmd, osp.join(args.work_dir, "logs", "benchmark.log"), args.verbose)
        out["throughput"] = read_throughput(osp.join(bench_dir, "benchmark.json"), configs)
    else:
        log("benchmark: tools/benchmark.py is missing: images/s left out")
    return out


def _schema_error(path, what):
    return DemoError(f"{path} does not hold {what} (has its tool's JSON schema changed?)")


def read_gmacs(path, configs):
    """``{config: segmentor GMACs}`` from ``tools/get_flops.py --json`` (schema
    ``fatr_seg.get_flops/1``: ``models[i].config``, ``models[i].segmentor.gmacs``)."""
    with open(path) as f:
        data = json.load(f)
    found = {}
    for model in data.get("models", []):
        for cfg in configs:
            if osp.normpath(str(model.get("config", ""))) == osp.normpath(cfg):
                try:
                    found[cfg] = float(model["segmentor"]["gmacs"])
                except (KeyError, TypeError, ValueError):
                    raise _schema_error(path, f"segmentor.gmacs for {cfg}") from None
    missing = [c for c in configs if c not in found]
    if missing:
        raise _schema_error(path, f"MACs of {', '.join(missing)}")
    return found


def read_throughput(path, configs):
    """``{config: images/s}`` (median, segmentor, batch 1) from ``tools/benchmark.py``'s JSON
    (schema ``fatr_seg.benchmark/1``: ``configs[i].name/path``, ``timing[j].config``,
    ``timing[j].images_per_s.median``)."""
    if not osp.isfile(path):
        raise DemoError(f"tools/benchmark.py wrote no {path}")
    with open(path) as f:
        data = json.load(f)
    names = {osp.normpath(c["path"]): c["name"] for c in data.get("configs", []) if "path" in c}
    found = {}
    for cfg in configs:
        name = names.get(osp.normpath(cfg))
        for rec in data.get("timing", []):
            if rec.get("config") == name and rec.get("target") == "segmentor":
                try:
                    found[cfg] = float(rec["images_per_s"]["median"])
                except (KeyError, TypeError, ValueError):
                    raise _schema_error(path, f"images_per_s.median for {cfg}") from None
                break
    missing = [c for c in configs if c not in found]
    if missing:
        skipped = "; ".join(str(s.get("reason")) for s in data.get("skipped", []))
        raise _schema_error(path, f"a segmentor timing of {', '.join(missing)}"
                            + (f" (skipped: {skipped})" if skipped else ""))  # fmt: skip
    return found


def step_visualize(args, ckpt):
    cmd = [sys.executable, "tools/visualize_tokens.py", args.config, "--checkpoint", ckpt,
           "--out-dir", args.work_dir]  # fmt: skip
    cmd += ["--cfg-options", *_cfg_options(args)]
    run_tool(cmd, osp.join(args.work_dir, "logs", "visualize.log"), args.verbose)
    overview = osp.join(args.work_dir, "tokens_overview.png")
    blocks = glob.glob(osp.join(args.work_dir, "tokens_block*.png"))
    blocks.sort(key=lambda p: int(re.search(r"block(\d+)", osp.basename(p)).group(1)))
    return ([overview] if osp.isfile(overview) else []) + blocks


# ------------------------------------------------------------------------------------- summary


def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def _ratio(num, den, spec=".2f"):
    return "n/a" if num is None or den in (None, 0) else format(num / den, spec) + "x"


def format_summary(results):
    """Markdown summary from the collected ``results`` dict (see :func:`main`)."""
    base, fatr = results["baseline_config"], results["fatr_config"]
    miou = results.get("miou", {})
    gmacs = results.get("bench", {}).get("gmacs", {})
    ips = results.get("bench", {}).get("throughput", {})
    size = results["size"]
    lines = [
        "# fatr_seg demo summary",
        "",
        f"Synthetic ADE20K-layout data ({results['num_train']} train / {results['num_val']} val, "
        f"{size}x{size}), ViT-T/16 with Segmenter's linear decoder trained from scratch for "
        f"{results.get('max_iters', '?')} iterations on {results['device']}.",
        f"Cost and throughput: one {size}x{size} image (batch 1), whole segmentor.",
        "",
        "| model | config | mIoU (%) | GMACs | images/s |",
        "|---|---|---|---|---|",
    ]
    for label, cfg in (("baseline (no reduction)", base), ("FATR", fatr)):
        m = miou.get(cfg, {}).get("mIoU")
        m = "not trained" if m is None else f"{m:.2f}"
        lines.append(f"| {label} | `{cfg}` | {m} | {_fmt(gmacs.get(cfg), '.3f')} "
                     f"| {_fmt(ips.get(cfg), '.2f')} |")  # fmt: skip
    lines += [
        "",
        f"- FATR / baseline GMACs: {_ratio(gmacs.get(fatr), gmacs.get(base))}",
        f"- FATR / baseline images/s: {_ratio(ips.get(fatr), ips.get(base))}",
    ]
    if miou.get(base, {}).get("mIoU") is not None and miou.get(fatr, {}).get("mIoU") is not None:
        delta = miou[fatr]["mIoU"] - miou[base]["mIoU"]
        lines.append(f"- FATR - baseline mIoU: {delta:+.2f} points")
    elif miou.get(fatr):
        lines.append("- baseline mIoU: not trained (run with --train-baseline to add it)")
    per_class = miou.get(fatr, {}).get("per_class")
    if per_class:
        lines += ["", "FATR per-class IoU (%): " + ", ".join(
            f"{k} {v:.1f}" for k, v in per_class.items())]  # fmt: skip
    if results.get("pictures"):
        lines += ["", "Token maps (HF tokens kept vs patches folded into DC windows):"]
        lines += [f"![{osp.basename(p)}]({osp.basename(p)})" for p in results["pictures"]]
    lines += ["", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["timings"].items()]
    total = results.get("total_s", sum(results["timings"].values()))
    lines.append(f"| **total (wall clock, start-up included)** | **{total:.1f}** |")
    return "\n".join(lines) + "\n"


def device_string():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(s.split(":", 1)[1].strip() for s in f if s.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


class Steps:
    """Numbered, timed steps: ``with steps("train"):`` logs the start, the end and the time."""

    def __init__(self, total, timings):
        self.total, self.timings, self.index = total, timings, 0
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, title):
        self.index += 1
        tag = f"step {self.index}/{self.total}: {title}"
        log(f"{tag} ...")
        t0 = time.perf_counter()
        yield
        self.timings[title] = time.perf_counter() - t0
        log(f"{tag} done in {self.timings[title]:.1f}s "
            f"(total {time.perf_counter() - self.start:.1f}s)")  # fmt: skip


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    os.chdir(REPO)
    results = dict(fatr_config=args.config, baseline_config=args.baseline_config,
                   num_train=args.num_train, num_val=args.num_val, size=args.size,
                   timings={}, miou={})  # fmt: skip
    models = [("fatr", args.config)] + (
        [("baseline", args.baseline_config)] if args.train_baseline else []
    )
    steps = Steps(2 + 2 * len(models) + 1, results["timings"])
    try:
        for config in (args.config, args.baseline_config):
            if not osp.isfile(config):
                raise DemoError(f"config not found: {config}")
        os.makedirs(args.work_dir, exist_ok=True)
        from mmengine.config import Config

        results["max_iters"] = args.max_iters or Config.fromfile(args.config).train_cfg.max_iters
        results["device"] = device_string()
        with steps("data"):
            step_data(args)
        ckpts = {}
        for name, config in models:
            with steps(f"train {name}"):
                ckpts[name] = step_train(args, config, name)
            with steps(f"test {name}"):
                results["miou"][config] = step_test(args, config, ckpts[name], name)
        with steps("benchmark"):
            results["bench"] = step_benchmark(args)
        with steps("token maps"):
            results["pictures"] = step_visualize(args, ckpts["fatr"])
    except DemoError as err:
        sys.exit(f"[demo] error: {err}")
    except KeyboardInterrupt:
        sys.exit("[demo] interrupted")
    results["total_s"] = time.perf_counter() - start
    summary = format_summary(results)
    path = osp.join(args.work_dir, "summary.md")
    with open(path, "w") as f:
        f.write(summary)
    with open(osp.join(args.work_dir, "summary.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n" + summary)
    log(f"summary written to {path}; total time {results['total_s']:.1f}s")
    return results


if __name__ == "__main__":
    main()
