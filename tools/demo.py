"""The embedded default (``make demo``): the workflow on a CPU, accuracy beside speed.

``python tools/demo.py [--work-dir work_dirs/demo] [--skip-train] [--quick] [--no-finetune]
[--max-iters N] [--finetune-iters N] [--threads N]``

Trains the ViT without reduction (the baseline) and evaluates it; evaluates FATR on the
baseline's weights training-free; fine-tunes FATR from the baseline by self-distillation and
evaluates it; measures the cost of both architectures and draws FATR's token maps; writes
``WORK_DIR/summary.md`` and prints it.
Each tool runs as a subprocess on ``--threads N`` CPU threads (default: torch's, one per core).
The steps are :mod:`fatr_seg.analysis.demo`; this file is the command line.
"""

import argparse
import sys
import time
import warnings

START = time.perf_counter()
# mmengine and mmcv import pkg_resources (hence setuptools < 81); its deprecation notice is noise.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from fatr_seg.analysis.demo import (
    BASELINE_CONFIG,
    DISTILL_CONFIG,
    FATR_CONFIG,
    QUICK,
    QUICK_OPTIONS,
    run_demo,
)
from fatr_seg.analysis.demo_report import DemoError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Run the embedded CPU demo end to end")
    parser.add_argument("--work-dir", default="work_dirs/demo", help="outputs and logs")
    parser.add_argument("--data-root", default="data/synthetic_ade", help="synthetic data root")
    parser.add_argument("--num-train", type=int, default=600, help="training images to generate")
    parser.add_argument("--num-val", type=int, default=100, help="validation images to generate")
    parser.add_argument("--size", type=int, default=384, help="generated image side (px)")
    parser.add_argument("--config", default=FATR_CONFIG, help="FATR demo config")
    parser.add_argument("--baseline-config", default=BASELINE_CONFIG, help="baseline config")
    parser.add_argument("--distill-config", default=DISTILL_CONFIG,
                        help="FATR fine-tuning (self-distillation) config")  # fmt: skip
    parser.add_argument("--max-iters", type=int, help="override the baseline's training length")
    parser.add_argument("--finetune-iters", type=int, help="override the fine-tuning length")
    parser.add_argument(
        "--skip-train",
        action="store_true",
        help="reuse the last checkpoints in WORK_DIR/baseline and WORK_DIR/fatr_finetune",
    )
    parser.add_argument(
        "--finetune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fine-tune FATR from the baseline by self-distillation and evaluate it (default: "
        "yes; --no-finetune shows the baseline and FATR training-free only)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads of every tool the demo runs (default: torch's, one per core, or "
        "OMP_NUM_THREADS when set)",
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
    for key in ("threads", "max_iters", "finetune_iters"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    if args.quick:
        args.num_train, args.num_val, args.size = (
            QUICK["num_train"],
            QUICK["num_val"],
            QUICK["size"],
        )
        args.max_iters = args.max_iters or QUICK["max_iters"]
        args.finetune_iters = args.finetune_iters or QUICK["finetune_iters"]
        args.bench_iters, args.bench_warmup = QUICK["bench_iters"], QUICK["bench_warmup"]
        args.cfg_options = QUICK_OPTIONS + list(args.cfg_options)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return run_demo(args, start=START)
    except DemoError as err:
        sys.exit(f"[demo] error: {err}")
    except KeyboardInterrupt:
        sys.exit("[demo] interrupted")


if __name__ == "__main__":
    main()
