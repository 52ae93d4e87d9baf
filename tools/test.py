"""Evaluate a checkpoint (mIoU through mmseg's IoUMetric):

``python tools/test.py CONFIG CHECKPOINT [--mode whole|slide] [--work-dir DIR] [--out DIR]
[--keep-ratio R [R ...]] [--compile] [--no-cuda-graph] [--amp]``.

On a CUDA machine the backbone and heads run from CUDA graphs (one per input shape; eager, with
a one-line message, where shapes vary or a capture fails): ``--no-cuda-graph`` runs them eager,
and ``--compile`` compiles them in ``torch.compile``'s ``reduce-overhead`` mode (its own CUDA
graphs) unless ``--no-cuda-graph`` is given too.
Multi-process: ``tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS`` (torchrun).
"""

import argparse
import os.path as osp
import warnings

# mmengine and mmcv import pkg_resources (hence setuptools < 81); its deprecation notice is noise.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import torch

from fatr_seg.models.compile import add_compile_hook
from fatr_seg.models.cuda_graph import add_cuda_graph_hook
from fatr_seg.models.keep_ratio import set_config_keep_ratio
from fatr_seg.models.preflight import PreflightError
from fatr_seg.models.runner import add_runner_args, run_tool


def parse_args():
    parser = argparse.ArgumentParser(description="Test (and eval) a segmentor")
    parser.add_argument("config", help="test config file path")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--out", help="dir to save the predicted segmentation maps")
    parser.add_argument("--show-dir", help="dir to save painted predictions")
    parser.add_argument("--mode", choices=["whole", "slide"], help="override test_cfg.mode")
    parser.add_argument("--keep-ratio", nargs="+", metavar="R",
                        help="evaluate at this budget: a keep ratio in (0, 1] for every "
                        "reduction layer, or one per layer")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="run the backbone and heads through torch.compile")  # fmt: skip
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="on CUDA, run eager instead of from CUDA graphs")  # fmt: skip
    parser.add_argument("--amp", action="store_true",
                        help="mixed-precision inference (mmengine's TestLoop fp16: fp16 autocast "
                        "on CUDA, bf16 on CPU)")  # fmt: skip
    add_runner_args(parser, "the dir to save the evaluation metrics", "override config settings")
    return parser.parse_args()


def configure(cfg, args):
    """The options only testing has: the checkpoint, the inference mode, the budget and the
    outputs."""
    if not osp.isfile(args.checkpoint):
        raise PreflightError(f"checkpoint not found: {args.checkpoint}")
    cfg.load_from = args.checkpoint
    if args.mode:
        cfg.model.test_cfg.mode = args.mode
    if args.keep_ratio:
        set_config_keep_ratio(cfg, args.keep_ratio, args.config)
    graphs = torch.cuda.is_available() and not getattr(args, "no_cuda_graph", False)
    if args.compile:
        add_compile_hook(cfg, **(dict(mode="reduce-overhead") if graphs else {}))
    elif graphs:
        add_cuda_graph_hook(cfg)
    if args.amp:
        cfg.test_cfg = {**(cfg.get("test_cfg") or dict(type="TestLoop")), "fp16": True}
    if args.out:
        cfg.test_evaluator["output_dir"] = args.out
        cfg.test_evaluator["keep_results"] = True
    if args.show_dir:
        cfg.default_hooks.visualization.update(draw=True, show=False)
        cfg.visualizer.save_dir = args.show_dir


def main():
    run_tool(parse_args(), configure, train=False)


if __name__ == "__main__":
    main()
