"""Train a segmentor: ``python tools/train.py CONFIG [--work-dir DIR] [--resume] [--amp]``.

Thin like mmseg's own: parse args, load the config, check its paths, build a Runner, train.
Multi-process: ``tools/dist_train.sh CONFIG NUM_PROCS`` (torchrun).
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
from fatr_seg.models.convert import CheckpointError  # noqa: E402
from fatr_seg.models.dist import setup_cpu_distributed  # noqa: E402
from fatr_seg.models.preflight import PreflightError, check_config  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description="Train a segmentor")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models")
    parser.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision training")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config settings, e.g. train_cfg.max_iters=100")  # fmt: skip
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main():
    args = parse_args()
    if not osp.isfile(args.config):
        sys.exit(f"config not found: {args.config}")
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = (
        args.work_dir
        or cfg.get("work_dir")
        or osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    )
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    cfg.resume = args.resume or cfg.get("resume", False)
    try:
        check_config(cfg, train=True)
    except PreflightError as err:
        sys.exit(f"error: {err}")
    setup_cpu_distributed(cfg, args.launcher)  # mmengine 0.10.7 needs CUDA for --launcher
    runner = Runner.from_cfg(cfg)
    try:
        runner.train()
    except CheckpointError as err:  # pretrained weights: unreadable, mismatched, not downloadable
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
