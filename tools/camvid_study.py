"""Every token reducer on a real pretrained Segmenter ViT-Ti/16 on CamVid, side by side.

``python tools/camvid_study.py --data-root DATA --pretrained VIT_TI [--baseline-checkpoint CKPT]
[--work-dir work_dirs/camvid_study] [--methods ...] [--seeds 0 1 2] [--finetune-as unreduced]
[--quick]``

Trains the unreduced Segmenter-Mask ViT-Ti/16 on CamVid from timm's ImageNet weights (or takes
``--baseline-checkpoint``), gives every method the budget that matches FATR's backbone MACs at
368x480, and measures per method: mIoU and per-class IoU on CamVid val (whole 360x480 images)
training-free on the baseline's weights and after self-distillation fine-tuning (``none`` gets
the same fine-tuning), MACs, images/s (1 thread, methods alternating), and the relative HF
amplitude per block. ``--finetune-as unreduced`` with several ``--variants`` gives mIoU at many
measured speeds (the frontier of docs/study.md). All training runs are mmengine Runner runs of
the configs in ``configs/camvid``.

Writes ``results.json`` (after every step; a re-run with the same options skips what is done,
and may add seeds or methods), ``table.md`` and plots under ``--work-dir``.
``--quick``: a smoke test on a few real images of the shared folder (``$FATR_SHARED`` or
``../shared``), skipped with a message where it is absent. See docs/study.md.

This file is the command line; the study is :mod:`fatr_seg.analysis.camvid_study`.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys
import time
import warnings

# mmengine and mmcv import pkg_resources (hence setuptools < 81); its deprecation notice is noise.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
# Notices of mmseg and mmengine that every Runner and model build repeats.
for _notice in ("``build_loss`` would be deprecated", "The draw is False"):
    warnings.filterwarnings("ignore", message=_notice)

from fatr_seg import REPO_ROOT  # noqa: E402
from fatr_seg.analysis.camvid_report import plot, write_report  # noqa: E402
from fatr_seg.analysis.camvid_runs import StudyError  # noqa: E402
from fatr_seg.analysis.camvid_study import (  # noqa: E402
    FINETUNE_AS,
    METHODS,
    PRESETS,
    SkipStudy,
    resolve_args,
    run_camvid_study,
)
from fatr_seg.analysis.store import log  # noqa: E402

CONFIGS = osp.join(REPO_ROOT, "configs", "camvid")
DEFAULTS = PRESETS["default"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--work-dir", default=osp.join("work_dirs", "camvid_study"))
    add(
        "--quick",
        action="store_true",
        help="CI smoke test: a few shared real images, tiny iteration counts, 1 seed",
    )
    add(
        "--data-root",
        help="CamVid in our layout (default: the config's data_root; --quick: the shared folder's)",
    )
    add("--pretrained", help="timm ViT-Ti/16 weights for the baseline (default: the config's)")
    add("--baseline-checkpoint", help="a trained unreduced segmentor: no baseline training")
    add("--baseline-config", default=osp.join(CONFIGS, "segmenter_vit-t_camvid.py"))
    add(
        "--model-config",
        default=osp.join(CONFIGS, "fatr-late_vit-t_camvid.py"),
        help="the reduced model (its reduction is the MACs reference; default: FATR's late "
        "schedule, a budget every peer can match)",
    )
    add("--distill-config", default=osp.join(CONFIGS, "fatr_vit-t_camvid_distill.py"))
    add("--methods", nargs="+", choices=METHODS, help=f"default: {' '.join(METHODS)}")
    add(
        "--variants",
        nargs="+",
        metavar="NAME=JSON",
        help="named reduction dicts run beside the methods at their own budget (a schedule "
        'search), e.g. \'local={"layers": [1, 5], "keep_ratio": [0.5, 0.7], ...}\'',
    )
    add(
        "--equal-macs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="match every peer's backbone MACs at 368x480 to FATR's (default on)",
    )
    add("--mac-tol", type=float, default=0.01, help="relative MACs tolerance (default 0.01)")
    add("--seeds", nargs="+", type=int, help="fine-tuning seeds (default 0 1 2)")
    add(
        "--no-finetune",
        dest="finetune",
        action="store_false",
        help="training-free only: mIoU, cost and HF amplitude on the baseline's weights (a "
        "first screen of --variants)",
    )
    add(
        "--finetune-as",
        choices=tuple(FINETUNE_AS),
        default="own",
        help="own: fine-tune each method with its reduction in the loop (default); unreduced: "
        "fine-tune only the unreduced model and apply every method to its weights (same seed); "
        "both",
    )
    g = p.add_argument_group("baseline training (with --baseline-checkpoint: unused)")
    g.add_argument("--base-iters", type=int, help=f"default {DEFAULTS['base_iters']}")
    g.add_argument("--base-lr", type=float, default=1e-4, help="AdamW lr (default 1e-4)")
    g.add_argument(
        "--head-lr-mult", type=float, default=10.0, help="decode head lr multiplier (default 10)"
    )
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-iters", type=int, help="linear warm-up (default 100), then poly")
    g.add_argument("--baseline-seed", type=int, default=0)
    g = p.add_argument_group("training data (baseline and fine-tuning)")
    g.add_argument("--batch-size", type=int, help="default 8")
    g.add_argument("--crop-size", type=int, help="square training crop (default 256)")
    g.add_argument("--train-images", type=int, help="first N training images (default: all)")
    g.add_argument("--val-images", type=int, help="first N validation images (default: all)")
    g.add_argument("--workers", type=int, help="dataloader workers (default 1)")
    g = p.add_argument_group("fine-tuning (configs/camvid/fatr_vit-t_camvid_distill.py)")
    g.add_argument("--ft-iters", type=int, help=f"default {DEFAULTS['ft_iters']}")
    g.add_argument("--ft-lr", type=float, default=1e-4, help="AdamW lr, cosine (default 1e-4)")
    g.add_argument("--temperature", type=float, default=1.0, help="distillation T")
    g.add_argument("--distill-weight", type=float, default=1.0)
    g.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EMA of the student; evaluated and saved (default on)",
    )
    g.add_argument(
        "--ema-momentum",
        type=float,
        help="mmengine's weight of the new value (default 10 / ft-iters)",
    )
    g.add_argument(
        "--scale-r",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fine-tune tome_constant with its r scaled to the crop's token count (default on; "
        "evaluated at the matched r)",
    )
    g = p.add_argument_group("measurements")
    g.add_argument("--hf-images", type=int, help="val images of the HF amplitude (default 8)")
    g.add_argument("--bench-batches", nargs="+", type=int, help="default 1 8")
    g.add_argument("--bench-rounds", type=int, help="timed rounds, median (default 5)")
    g.add_argument("--bench-threads", type=int, default=1)
    g.add_argument("--threads", type=int, help="torch threads of training and evaluation")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    try:
        resolve_args(args)
        log(f"settings: {vars(args)}")
        data = run_camvid_study(args)
    except SkipStudy as err:
        print(f"skipped: {err}")
        return
    except StudyError as err:
        sys.exit(f"error: {err}")
    print(write_report(data, args.work_dir))
    for path in plot(data, args.work_dir):
        log(f"wrote {path}")
    log(f"done in {time.time() - t0:.0f} s; results in {osp.join(args.work_dir, 'results.json')}")


if __name__ == "__main__":
    main()
