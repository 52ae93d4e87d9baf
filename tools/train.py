"""Train a segmentor: ``python tools/train.py CONFIG [--work-dir DIR] [--resume] [--amp]``.

Thin like mmseg's own: parse args, then :func:`fatr_seg.models.runner.run_tool` loads the config,
checks its paths, builds a Runner and trains.
Multi-process: ``tools/dist_train.sh CONFIG NUM_PROCS`` (torchrun).
"""

import argparse
import warnings

# mmengine and mmcv import pkg_resources (hence setuptools < 81); its deprecation notice is noise.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from fatr_seg.models.runner import add_runner_args, run_tool


def parse_args():
    parser = argparse.ArgumentParser(description="Train a segmentor")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision training")
    add_runner_args(parser, "the dir to save logs and models",
                    "override config settings, e.g. train_cfg.max_iters=100")  # fmt: skip
    return parser.parse_args()


def configure(cfg, args):
    """The options only training has: mixed precision and resuming."""
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    cfg.resume = args.resume or cfg.get("resume", False)


def main():
    run_tool(parse_args(), configure, train=True)


if __name__ == "__main__":
    main()
