"""The embedded default (``make demo``): data, training, mIoU, cost and token maps on a CPU.

``python tools/demo.py [--work-dir work_dirs/demo] [--skip-train] [--quick]
[--no-train-baseline] [--threads N]``

Trains FATR and the same ViT without reduction (same iterations and schedule), evaluates both,
measures their cost and draws FATR's token maps; writes ``WORK_DIR/summary.md`` and prints it.
Each tool runs as a subprocess with the CPU threads the machine's load leaves free (chosen before
each step, printed with its reason). The steps are :mod:`fatr_seg.analysis.demo`; this file is
the command line.
"""

import argparse
import sys
import time
import warnings

START = time.perf_counter()
# mmengine and mmcv import pkg_resources (hence setuptools < 81); its deprecation notice is noise.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from fatr_seg.analysis.demo import BASELINE_CONFIG, FATR_CONFIG, QUICK, QUICK_OPTIONS, run_demo
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
    parser.add_argument("--max-iters", type=int, help="override the training length (both models)")
    parser.add_argument(
        "--skip-train",
        action="store_true",
        help="reuse the last checkpoints in WORK_DIR/fatr and WORK_DIR/baseline",
    )
    parser.add_argument(
        "--train-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train and evaluate the baseline, for its mIoU beside FATR's (default: yes; "
        "--no-train-baseline trains FATR only, about half the training time)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads of every step (default: chosen before each step from the CPUs other "
        "processes leave free; OMP_NUM_THREADS, when set, is taken as is)",
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
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
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
