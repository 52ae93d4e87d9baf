"""``tools/demo.py`` (``make demo``): train a plain ViT segmentor, turn it into FATR, measure
both, accuracy beside speed, on a CPU.

:func:`run_demo` runs each step through its tool, in a subprocess from the repository root: the
synthetic data (if absent); the baseline trained (``tools/train.py``) and evaluated
(``tools/test.py``); FATR training-free (the FATR config on the baseline's checkpoint); FATR
fine-tuned by self-distillation from the baseline, evaluated; the cost of both configs
(``tools/benchmark.py``, ``tools/get_flops.py``); FATR's token maps; ``WORK_DIR/summary.md``.
Each tool runs on ``--threads`` CPU threads (default: torch's, one per core) and logs to
``WORK_DIR/logs/STEP.log`` with progress lines echoed; its results are read back from the files
it writes (a file that does not hold what is expected, or a failing step, raises
:class:`.demo_report.DemoError` naming it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import os.path as osp
import platform
import re
import subprocess
import sys
import time

from .. import REPO_ROOT
from .demo_report import (
    DemoError,
    format_summary,
    read_gmacs,
    read_test_metrics,
    read_throughput,
)
from .store import write_files
from .timing import iteration_time

__all__ = ["BASELINE_CONFIG", "DISTILL_CONFIG", "FATR_CONFIG", "QUICK", "last_checkpoint",
           "run_demo"]  # fmt: skip

FATR_CONFIG = "configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py"
BASELINE_CONFIG = "configs/demo/segmenter_vit-t_fcn_1xb8-200_synthetic-192x192.py"
DISTILL_CONFIG = "configs/demo/fatr_vit-t_fcn_distill-1xb8-100_synthetic-192x192.py"
# Lines of the tools' output worth echoing: training/eval progress, results, errors.
PROGRESS = re.compile(
    r"Iter\((train|val|test)\)|mIoU:|Saving checkpoint|per class results|^\|"
    r"|Error|error:|warning:|Traceback|^block \d+:|^wrote |img/s|GMACs|GFLOPs"
    r"|unreduced model's|distillation teacher"
)
QUICK = dict(num_train=8, num_val=4, size=96, max_iters=4, finetune_iters=2, bench_iters=2,
             bench_warmup=1)  # fmt: skip
# --quick also trains with batch 2, logs every iteration and loads data in the main process.
QUICK_OPTIONS = ["train_dataloader.batch_size=2", "default_hooks.logger.interval=1"] + [
    f"{loader}.num_workers=0"
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader")
]


def log(msg):
    print(f"[demo] {msg}", flush=True)


def run_tool(cmd, log_path, verbose=False, env=None):
    """Run ``cmd`` from the repo root with the extra environment ``env``, log everything to
    ``log_path`` and echo progress lines; a non-zero exit raises :class:`DemoError`."""
    os.makedirs(osp.dirname(log_path), exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    env["PYTHONWARNINGS"] = env.get("PYTHONWARNINGS", "ignore::UserWarning")
    last = []
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
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


def _schedule_options(config, iters):
    """``--cfg-options`` that make ``config``'s training ``iters`` long, its schedule too (the
    baseline's warm-up over a sixth of the run, at most 50, then poly decay; the distillation's
    one cosine decay over the whole run)."""
    from mmengine.config import Config

    opts = [f"train_cfg.max_iters={iters}", f"default_hooks.checkpoint.interval={iters}"]
    schedulers = Config.fromfile(config).get("param_scheduler") or []
    if len(schedulers) == 1 and schedulers[0].get("T_max") is not None:
        return opts + [f"param_scheduler.0.T_max={iters}", f"param_scheduler.0.end={iters}"]
    if len(schedulers) != 2:
        raise DemoError(f"{config}: --max-iters/--finetune-iters know the demo's schedules "
                        f"(warm-up + decay, or one cosine decay), not {len(schedulers)} "
                        "schedulers")  # fmt: skip
    warm = max(1, min(50, iters // 6))
    return opts + [f"param_scheduler.0.end={warm}", f"param_scheduler.1.begin={warm}",
                   f"param_scheduler.1.end={max(iters, warm + 1)}"]  # fmt: skip


def cfg_options(args, train_config=None, iters=None):
    """``--cfg-options`` for the tools: the data root, and for training ``train_config`` its
    length ``iters`` (None: the config's) and no validation (``tools/test.py`` follows)."""
    if train_config:
        # The test loader stays configured (train.py's preflight checks its folder too).
        opts = [f"train_dataloader.dataset.data_root={args.data_root}",
                f"test_dataloader.dataset.data_root={args.data_root}",
                "val_cfg=None", "val_dataloader=None", "val_evaluator=None"]  # fmt: skip
        if iters:
            opts += _schedule_options(train_config, iters)
    else:
        opts = [f"{loader}.dataset.data_root={args.data_root}"
                for loader in ("val_dataloader", "test_dataloader")]  # fmt: skip
    extra = list(args.cfg_options)
    if train_config:  # validation is switched off above: options for its loader have no target
        extra = [o for o in extra if not o.startswith("val_")]
    return opts + extra


def step_data(args):
    from ..datasets.synthetic import is_complete, write_dataset

    settings = dict(num_train=args.num_train, num_val=args.num_val, size=(args.size,) * 2, seed=0)
    if is_complete(args.data_root, **settings):
        log(f"data: {args.data_root} already holds {args.num_train} + {args.num_val} images")
        return
    log(f"data: generating {args.num_train} + {args.num_val} images of {args.size}x{args.size} "
        f"into {args.data_root}")  # fmt: skip
    write_dataset(args.data_root, progress=True, force=True, **settings)


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


def run_step(args, log_name, tool, *tool_args):
    """Run ``tools/TOOL`` with ``tool_args`` on ``--threads`` threads (None: torch's default),
    logged to ``WORK_DIR/logs/LOG_NAME.log``; the log's path."""
    n = args.threads
    env = {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)} if n else None
    log_path = osp.join(args.work_dir, "logs", f"{log_name}.log")
    return run_tool([sys.executable, f"tools/{tool}", *tool_args], log_path, args.verbose, env)


def step_train(args, config, name, results, iters=None, extra=()):
    """Train ``config`` into ``WORK_DIR/name`` (``iters`` long, ``extra`` cfg-options); its
    last checkpoint."""
    work_dir = osp.join(args.work_dir, name)
    if args.skip_train:
        ckpt = last_checkpoint(work_dir)
        log(f"train ({name}): skipped, using {ckpt}")
        return ckpt
    run_step(args, f"train_{name}", "train.py", config, "--work-dir", work_dir,
             "--cfg-options", *cfg_options(args, config, iters), *extra)  # fmt: skip
    runs = sorted(glob.glob(osp.join(work_dir, "*", "vis_data", "scalars.json")), key=osp.getmtime)
    results["train_speed"][name] = iteration_time(runs[-1]) if runs else None
    return last_checkpoint(work_dir)


def step_test(args, config, ckpt, name):
    """mIoU and per-class IoU of ``config`` with the weights of ``ckpt``."""
    test_dir = osp.join(args.work_dir, f"{name}_test")
    run_step(args, f"test_{name}", "test.py", config, ckpt, "--work-dir", test_dir,
             "--cfg-options", *cfg_options(args))  # fmt: skip
    metrics = read_test_metrics(test_dir)
    log(f"test ({name}): mIoU {metrics['mIoU']:.2f} %")
    return metrics


def step_benchmark(args):
    """GMACs (``tools/get_flops.py``) and images/s (``tools/benchmark.py``) of both configs."""
    bench_dir, configs = osp.join(args.work_dir, "benchmark"), [args.baseline_config, args.config]
    path = osp.join(bench_dir, "flops.json")
    run_step(args, "flops", "get_flops.py", *configs, "--shape", str(args.size), str(args.size),
             "--json", path)  # fmt: skip
    out = dict(gmacs=read_gmacs(path, configs))
    # Throughput only: MACs come from get_flops; memory probes would double this step's time.
    run_step(args, "benchmark", "benchmark.py", *configs, "--shapes", str(args.size),
             "--batch-sizes", "1", "--iters", str(args.bench_iters),
             "--warmup", str(args.bench_warmup), "--targets", "segmentor", "--device", "cpu",
             "--no-memory", "--no-macs", "--no-progress", "--out-dir", bench_dir)  # fmt: skip
    out["throughput"] = read_throughput(osp.join(bench_dir, "benchmark.json"), configs)
    return out


def step_visualize(args, ckpt):
    run_step(args, "visualize", "visualize_tokens.py", args.config, "--checkpoint", ckpt,
             "--out-dir", args.work_dir, "--cfg-options", *cfg_options(args))  # fmt: skip
    overview = osp.join(args.work_dir, "tokens_overview.png")
    blocks = glob.glob(osp.join(args.work_dir, "tokens_block*.png"))
    blocks.sort(key=lambda p: int(re.search(r"block(\d+)", osp.basename(p)).group(1)))
    return ([overview] if osp.isfile(overview) else []) + blocks


def device_string():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(s.split(":", 1)[1].strip() for s in f if s.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def run_demo(args, start=None):
    """Run the demo with the parsed options of ``tools/demo.py``; writes and prints
    ``WORK_DIR/summary.md``, and returns the results (also in ``WORK_DIR/summary.json``).
    ``start``: ``time.perf_counter()`` at the program's start."""
    start = time.perf_counter() if start is None else start
    os.chdir(REPO_ROOT)  # tools/ and configs/ are there
    configs = [args.baseline_config, args.config] + ([args.distill_config] if args.finetune else [])
    for config in configs:
        if not osp.isfile(config):
            raise DemoError(f"config not found: {config}")
    os.makedirs(args.work_dir, exist_ok=True)
    results = dict(fatr_config=args.config, baseline_config=args.baseline_config,
                   distill_config=args.distill_config if args.finetune else None,
                   num_train=args.num_train, num_val=args.num_val, size=args.size,
                   threads=args.threads, timings={}, miou={}, train_speed={},
                   models=[])  # fmt: skip
    from mmengine.config import Config

    length = [args.max_iters, args.finetune_iters]  # None: the config's
    for key, given, config in zip(("max_iters", "finetune_iters"), length, configs[::2]):
        results[key] = given or Config.fromfile(config).train_cfg.max_iters
    results["device"] = device_string()
    total = 6 + 2 * args.finetune

    @contextlib.contextmanager
    def steps(title):  # numbered and timed: logs the start, the end and the time
        tag = f"step {len(results['timings']) + 1}/{total}: {title}"
        log(f"{tag} ...")
        t0 = time.perf_counter()
        yield
        results["timings"][title] = time.perf_counter() - t0
        log(f"{tag} done in {results['timings'][title]:.1f}s "
            f"(total {time.perf_counter() - start:.1f}s)")  # fmt: skip

    def evaluate(key, label, config, ckpt):
        with steps(f"test {key}"):
            results["miou"][key] = step_test(args, config, ckpt, key)
        results["models"].append(dict(key=key, label=label, config=config, checkpoint=ckpt))

    with steps("data"):
        step_data(args)
    with steps("train baseline"):
        base_ckpt = step_train(args, args.baseline_config, "baseline", results, args.max_iters)
    evaluate("baseline", "baseline (no reduction)", args.baseline_config, base_ckpt)
    # The FATR config with the baseline's weights: only the reduction's own parameters are not
    # in the checkpoint, and their init makes each block the unreduced one.
    evaluate("fatr_training_free", "FATR training-free", args.config, base_ckpt)
    fatr_ckpt = base_ckpt
    if args.finetune:
        with steps("fine-tune FATR"):
            fatr_ckpt = step_train(args, args.distill_config, "fatr_finetune", results,
                                   args.finetune_iters,
                                   [f"model.teacher_checkpoint={base_ckpt}"])  # fmt: skip
        evaluate("fatr_finetuned", "FATR fine-tuned", args.config, fatr_ckpt)
    with steps("benchmark"):
        results["bench"] = step_benchmark(args)
    with steps("token maps"):
        results["pictures"] = step_visualize(args, fatr_ckpt)
    results["total_s"] = time.perf_counter() - start
    summary = format_summary(results)
    paths = write_files(args.work_dir, "summary", results, summary)
    print("\n" + summary)
    log(f"summary written to {paths['md']}; total time {results['total_s']:.1f}s")
    return results
