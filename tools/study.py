"""Side-by-side accuracy study of the token reducers on the synthetic ADE20K-layout set.

``python tools/study.py [--quick] [--work-dir work_dirs/study] [--seeds 3] ...``

For every seed: train a baseline ViT segmentor (mmseg Runner, ``reduction=None``); then, for each
reducer (``fatr``, ``evit``, ``tome``, ``random``) at the same token budget (the same reduction
layers and ``keep_ratio``), measure mIoU training-free on the baseline weights and after the same
short fine-tuning. The unreduced baseline gets the same fine-tuning too (``none``), so the extra
iterations are not mistaken for a gain of the reducers. Then, on one machine in one process:

* MACs of one forward (:func:`fatr_seg.analysis.flops.count_macs`: ``FlopCounterMode`` plus a
  formula for the fused CPU attention op, which would otherwise count zero);
* images/s (forward only, methods timed round-robin so background load hits all alike);
* per-layer rank-collapse diagnostics (:mod:`fatr_seg.analysis.rank_collapse`);
* per-layer IoU between FATR's HF set and EViT's kept set on the same weights and images.

Writes ``results.json``, ``table.md`` and ``*.png`` plots under ``--work-dir``. Results are saved
after every step and reused on a re-run with the same settings (delete the folder to start over).

This file is the command line; the study is :mod:`fatr_seg.analysis.study` (runs, measurements,
``results.json``) and :mod:`fatr_seg.analysis.study_report` (table and plots).
"""

from __future__ import annotations

import argparse
import os.path as osp
import warnings

# mmengine and mmcv import pkg_resources (hence setuptools < 81); its deprecation notice is noise.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from fatr_seg.analysis.study import METHODS, PRESETS, VARIANTS, log, run_study
from fatr_seg.analysis.study_report import plot, write_report

REPO = osp.abspath(osp.join(osp.dirname(osp.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CI-sized run (1 seed, few iters)")
    p.add_argument("--work-dir", default=osp.join("work_dirs", "study"))
    p.add_argument("--data-root", help="synthetic data folder (default: WORK_DIR/data)")
    p.add_argument(
        "--config",
        default=osp.join(REPO, "configs", "fatr_ade20k_demo.py"),
        help="base config (the embedded default); model and schedule are overridden",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + VARIANTS)
    p.add_argument("--layers", nargs="+", type=int, default=[4, 7, 10],
                   help="1-indexed reduction blocks")  # fmt: skip
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument(
        "--shared-baseline",
        action="store_true",
        help="train ONE baseline (seed 0) and vary only the fine-tuning seed",
    )
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (default 1: the models are tiny, and on a loaded machine two "
        "OpenMP threads waiting on each other made a training step 30x slower)",
    )  # fmt: skip
    p.add_argument("--skip-bench", action="store_true", help="no throughput timing")
    for key, value in PRESETS["default"].items():
        flag = "--" + key.replace("_", "-")
        p.add_argument(flag, type=type(value), help=f"default {value} (quick: "
                       f"{PRESETS['quick'][key]})")  # fmt: skip
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "default"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.data_root is None:
        args.data_root = osp.join(args.work_dir, "data")
    if args.depth < max(args.layers):
        p.error(f"--depth {args.depth} is smaller than the last reduction layer {max(args.layers)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    log(f"settings: {vars(args)}")
    data = run_study(args)
    print(write_report(data, args.work_dir))
    for path in plot(data, args.work_dir):
        log(f"wrote {path}")
    log(f"done; results in {osp.join(args.work_dir, 'results.json')}")


if __name__ == "__main__":
    main()
