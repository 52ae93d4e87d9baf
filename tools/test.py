"""Evaluate a checkpoint (mIoU through mmseg's IoUMetric):

``python tools/test.py CONFIG CHECKPOINT [--mode whole|slide] [--work-dir DIR] [--out DIR]
[--compile]``.
"""

import argparse
import os
import os.path as osp
import sys
import warnings

# mmengine and mmcv import pkg_resources (hence setuptools < 81); its deprecation notice is noise.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), ".."))
from fatr_seg.models.compile import add_compile_hook  # noqa: E402
from fatr_seg.models.preflight import PreflightError, check_config  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description="Test (and eval) a segmentor")
    parser.add_argument("config", help="test config file path")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--work-dir", help="the dir to save the evaluation metrics")
    parser.add_argument("--out", help="dir to save the predicted segmentation maps")
    parser.add_argument("--show-dir", help="dir to save painted predictions")
    parser.add_argument("--mode", choices=["whole", "slide"], help="override test_cfg.mode")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the backbone and heads through torch.compile (inductor)",
    )
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config settings")  # fmt: skip
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main():
    args = parse_args()
    if not osp.isfile(args.config):
        sys.exit(f"config not found: {args.config}")
    if not osp.isfile(args.checkpoint):
        sys.exit(f"error: checkpoint not found: {args.checkpoint}")
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = (
        args.work_dir
        or cfg.get("work_dir")
        or osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    )
    cfg.load_from = args.checkpoint
    if args.mode:
        cfg.model.test_cfg.mode = args.mode
    if args.compile:
        add_compile_hook(cfg)
    if args.out:
        cfg.test_evaluator["output_dir"] = args.out
        cfg.test_evaluator["keep_results"] = True
    if args.show_dir:
        hook = cfg.default_hooks.visualization
        hook.update(draw=True, show=False)
        cfg.visualizer.save_dir = args.show_dir
    try:
        check_config(cfg, train=False)
    except PreflightError as err:
        sys.exit(f"error: {err}")
    runner = Runner.from_cfg(cfg)
    runner.test()


if __name__ == "__main__":
    main()
