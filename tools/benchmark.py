"""Throughput, peak memory and MACs: baseline vs FATR segmentors, side by side.

Usage::

    python tools/benchmark.py [CONFIG ...] [--targets backbone segmentor train]
        [--shapes 384 512 768 1024] [--batch-sizes 1 8] [--iters 10] [--warmup W]
        [--device cpu|cuda] [--dtypes float32] [--out-dir work_dirs/benchmark]
        [--max-cell-seconds S] [--time-budget S] [--memory-shapes ...]
        [--memory-batch-sizes ...] [--memory-targets ...] [--no-memory] [--no-macs]
        [--threads N] [--quick] [--keep-ratio R [R ...]] [--compile] [--cpu-time]
        [--no-cuda-graph]

CONFIGs default to ``configs/baseline_vit-s_ade20k.py configs/fatr_ade20k.py``; the FIRST is
the reference of every speed-up. ``--keep-ratio R1 R2 ...`` runs every config that has a token
reduction once per budget (a keep ratio in (0, 1], or one per reduction layer joined by commas:
``0.5,0.6,0.7``), as ``NAME@keepR`` rows in the same alternation; a config without reduction
runs once. Pretrained weights are never loaded (speed does not depend on them). Inputs are
synthetic ADE20K-like images (``fatr_seg.datasets.synthetic``), normalised with the config's
mean/std.

What is measured, per (dtype, shape, batch, target):

* ``backbone``: ``model.backbone(x)`` (patch embedding, blocks with reduction, then
  restoration, or the compact token set for a backbone built with ``compact_output=True``);
* ``segmentor``: ``model.encode_decode(x, metas)``: backbone, decode head and the resize of
  the logits to the input size, i.e. mmseg's whole-image inference without data loading;
* ``train`` (opt-in): one training step without the optimizer update: ``model.loss(x,
  samples)`` in train mode on the synthetic label maps, then the backward. Dropout and drop
  path run as configured. No MACs are counted for it, so it has no MACs ideal.

The configs run in alternation (A B A B ...), forward targets in ``torch.inference_mode``, after
``--warmup`` untimed rounds; ``--iters`` timed rounds give the median and IQR. CUDA runs under
``torch.autocast`` (bf16 and fp16 by default) with a synchronisation around every call, and the
forward targets' backbone, neck and decode head of every config replay from CUDA graphs (one per
input shape and dtype, captured in the warm-up; eager, in one line, where a capture fails):
``--no-cuda-graph`` times them eager, as ``--compile`` does (its twins compile the modules).
``settings.cuda_graph`` in the JSON says which.

Time limits. A cell is one (dtype, shape, batch, target) with every config in it; cells run in
the order of ``--shapes`` (the default: smallest first), batch sizes ascending. Before a cell
runs, its time is estimated from the same (dtype, target, shape) at a smaller batch, else from a
smaller shape scaled by the reference's MACs, else (no estimate yet) from its own warm-up. The
cell is skipped, and listed under ``skipped`` in the JSON and the table (never silently
dropped), when:

* ``--max-cell-seconds S``: its estimate exceeds S seconds (default 240 on CPU, 600 on CUDA);
* ``--time-budget S``: it would end more than S seconds after the run started (the models built,
  MAC counting included) (default 1500 on CPU, none on CUDA).

``0`` lifts either limit. Both apply to the timed cells; the memory probes run after
them, outside the budget, each stopped after 4 x ``--max-cell-seconds`` (at least 600 s). The CPU
defaults keep a default CPU run near 30 minutes. The JSON records both under ``settings``
(``max_cell_seconds``, ``time_budget``; 0 = no limit).

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak RSS of a fresh child
process per (config, target, shape, batch) (``VmHWM`` reset after the model is built, so it
measures the forward). The HF score's own time (exact and from Q query rows) is
``tools/hf_score_estimate.py``'s.

Outputs under ``--out-dir``: ``benchmark.json``, ``benchmark.md`` and ``speedup.png``
(speed-up vs tokens). ``--quick`` (CI): a tiny model (embed 64, 2 heads), shapes 64 and 128,
batch 1 and 2, 2 iterations.

This file is the command line; the measurements are in :mod:`fatr_seg.analysis.benchmark` (the
run, time limits, MACs), :mod:`fatr_seg.analysis.benchmark_models` (segmentors, inputs, forward
passes, memory probe) and :mod:`fatr_seg.analysis.benchmark_report` (markdown, plot, files).

JSON schema (``benchmark.json``)::

    {"schema": "fatr_seg.benchmark/1", "date": str, "command": str,
     "machine": {"platform": str, "cpu_count": int, "torch_threads": int, "device": str,
                 "load_avg": [float, float, float] | null},
     "versions": {"python": str, "torch": str, "mmseg": str | null, "triton": str | null},
     "settings": {"device": str, "dtypes": [str], "shapes": [[H, W]], "batch_sizes": [int],
                  "targets": [str], "iters": int, "warmup": int, "max_cell_seconds": float,
                  "time_budget": float, "quick": bool, "compile": bool, "cpu_time": bool,
                  "cuda_graph": bool},
     "reference": str,                                  # name of the first config
     "configs": [{"name": str, "path": str, "reduction": dict | null}],
     "macs": [{"config": str, "shape": [H, W], "tokens": int,
               "backbone": int, "segmentor": int, "scoring": int, "dc_term": int}],
     "timing": [{"config": str, "target": "backbone" | "segmentor" | "train", "device": str,
                 "dtype": str, "shape": [H, W], "tokens": int, "batch": int, "iters": int,
                 "median_s": float, "q1_s": float, "q3_s": float, "iqr_s": float,
                 "images_per_s": {"median": float, "q1": float, "q3": float, "iqr": float},
                 "times_s": [float], "warmup_s": [float],
                 "speedup": float,          # reference median time / this median time
                 "speedup_paired": float,   # median over rounds of t_ref / t_this
                 "macs_ratio": float | null,          # this MACs / reference MACs
                 "speedup_per_ideal": float | null,   # speedup * macs_ratio (1.0 = ideal)
                 "compiled": bool, "compile_s": float | null,  # --compile twins
                 "speedup_same_mode": float}],  # against the reference run the same way
     "skipped": [{"kind": "timing", "target": str, "dtype": str,
                  "shape": [H, W], "batch": int, "reason": str}],
     "memory": [{"config": str, "target": str, "device": str, "dtype": str, "shape": [H, W],
                 "tokens": int, "batch": int, "peak_bytes": int, "before_bytes": int,
                 "forward_bytes": int, "method": "cuda_max_memory_allocated" | "child_vmhwm"
                 | "child_maxrss", "error": str | null}]}
"""

import argparse
import os.path as osp
import sys
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import torch

from fatr_seg.analysis.benchmark import DEFAULT_TARGETS, TARGETS, Bench
from fatr_seg.analysis.benchmark_models import DTYPES, config_variants
from fatr_seg.analysis.benchmark_report import write_outputs
from fatr_seg.models.cuda_graph import cuda_graph_modules
from fatr_seg.models.keep_ratio import KeepRatioError, parse_keep_ratio

DEFAULT_CONFIGS = ["configs/baseline_vit-s_ade20k.py", "configs/fatr_ade20k.py"]
QUICK = dict(shapes=[(64, 64), (128, 128)], batch_sizes=[1, 2], iters=2, warmup=1)


def _shape(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be S or HxW in pixels, got {text!r}"
        ) from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must be S or HxW in pixels, got {text!r}")
    return tuple(parts)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where the help text does not already explain it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark images/s, peak memory and MACs of segmentors "
        "(the first config is the reference).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("configs", nargs="*", help=f"config files (default: {DEFAULT_CONFIGS})")
    p.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        default=list(DEFAULT_TARGETS),
        help="what is timed: the backbone's forward, the whole segmentor's forward, and/or one "
        "training step (forward, loss and backward of the segmentor; no MACs)",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        type=_shape,
        default=None,
        help="input sizes, S or HxW (default 384 512 768 1024)",
    )
    p.add_argument(
        "--batch-sizes",
        nargs="+",
        type=_positive,
        default=None,
        help="default: 1 8 on CPU, 1 8 32 on CUDA",
    )
    p.add_argument("--iters", type=_positive, default=None, help="timed rounds (default 10)")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed rounds first (default: 1 on CPU, 3 on CUDA)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(DTYPES),
        default=None,
        help="default: float32 on CPU, bfloat16 float16 on CUDA (autocast)",
    )
    p.add_argument("--out-dir", default="work_dirs/benchmark", help="JSON, table and plot")
    p.add_argument(
        "--max-cell-seconds",
        type=float,
        default=None,
        help="skip a cell estimated to take longer (0: never skip; default 240 on "
        "CPU, 600 on CUDA)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="skip cells that would end later than this many seconds after the start (0: "
        "none; default 1500 on CPU, none on CUDA)",
    )
    p.add_argument(
        "--memory-shapes",
        nargs="+",
        type=_shape,
        default=None,
        help="shapes of the peak-memory probes (default: --shapes)",
    )
    p.add_argument(
        "--memory-batch-sizes",
        nargs="+",
        type=_positive,
        default=None,
        help="batch sizes of the memory probes (default: 1 on CPU, --batch-sizes on CUDA)",
    )
    p.add_argument(
        "--memory-targets",
        nargs="+",
        choices=TARGETS,
        default=None,
        help="targets of the memory probes (default: --targets; backbone with --quick)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--no-macs", action="store_true", help="skip the MAC counts")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    p.add_argument("--quick", action="store_true",
                   help="CI mode: tiny model, shapes 64 128, batch 1 2, 2 iterations")  # fmt: skip
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time every config through torch.compile (fullgraph, inductor; the backbone, "
        "or encode_decode for the segmentor), as CONFIG+compile in the same alternation",
    )
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time each call by the CPU time of the calling thread instead of wall time (CPU "
        "with --threads 1 only): other processes taking the core do not count",
    )
    p.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="on CUDA, time the forward targets eager instead of from CUDA graphs",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--keep-ratio",
        nargs="+",
        metavar="R",
        help="budgets: each config with a reduction runs once per value, as NAME@keepR (a keep "
        "ratio in (0, 1], or one per reduction layer joined by commas, e.g. 0.5,0.6,0.7)",
    )
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python tools/benchmark.py", *given])  # recorded in the JSON
    args.configs = args.configs or list(DEFAULT_CONFIGS)
    for path in args.configs:
        if not osp.isfile(path):
            p.error(f"config not found: {path}")
    if args.keep_ratio:
        try:
            args.keep_ratio = [parse_keep_ratio(r) for r in args.keep_ratio]
            config_variants(args.configs, args.keep_ratio)  # does each fit its config?
        except KeepRatioError as err:
            p.error(str(err))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        args.device = torch.device(device)
    except RuntimeError as err:
        p.error(f"--device {device!r}: {err}")
    cuda = args.device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda given but torch sees no CUDA device")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {device!r}")
    if args.quick:
        args.shapes = args.shapes or QUICK["shapes"]
        args.batch_sizes = args.batch_sizes or QUICK["batch_sizes"]
        args.iters = args.iters or QUICK["iters"]
        args.warmup = QUICK["warmup"] if args.warmup is None else args.warmup
        args.memory_shapes = args.memory_shapes or args.shapes[:1]
        args.memory_targets = args.memory_targets or ["backbone"]
    args.shapes = args.shapes or [_shape(s) for s in ("384", "512", "768", "1024")]
    args.batch_sizes = sorted(set(args.batch_sizes or ([1, 8, 32] if cuda else [1, 8])))
    args.iters = args.iters or 10
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    args.dtypes = args.dtypes or (["bfloat16", "float16"] if cuda else ["float32"])
    if not cuda and any(d != "float32" for d in args.dtypes):
        p.error("on CPU only --dtypes float32 is benchmarked (bf16 and fp16 are timed on CUDA)")
    if args.cpu_time and (cuda or args.threads != 1):
        p.error("--cpu-time measures one CPU thread: use it with --device cpu --threads 1")
    if args.max_cell_seconds is None:
        args.max_cell_seconds = 600.0 if cuda else 240.0
    if args.time_budget is None:
        args.time_budget = 0.0 if cuda else 1500.0
    args.memory_shapes = args.memory_shapes or args.shapes
    args.memory_targets = args.memory_targets or args.targets
    args.memory_batch_sizes = sorted(
        set(args.memory_batch_sizes or (args.batch_sizes if cuda else [1]))
    )
    args.cuda_graph = cuda and not (args.no_cuda_graph or args.compile)
    return args


def run(args) -> dict:
    """The benchmark's result, its forward targets from CUDA graphs where ``args.cuda_graph``
    (one per shape, batch and dtype of the run, so none falls back for their number)."""
    bench = Bench(args)
    if args.cuda_graph:
        signatures = len(args.shapes) * len(args.batch_sizes) * len(args.dtypes)
        for model in bench.models.values():
            cuda_graph_modules(model, max_graphs=signatures)
    result = bench.run()
    result["settings"]["cuda_graph"] = args.cuda_graph
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    paths, markdown = write_outputs(result, args.out_dir)
    print(markdown)
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
