"""Throughput, peak memory and scoring cost: baseline vs FATR segmentors, side by side.

Usage::

    python tools/benchmark.py [CONFIG ...] [--targets backbone segmentor]
        [--shapes 384 512 768 1024] [--batch-sizes 1 8] [--iters 10] [--warmup W]
        [--device cpu|cuda] [--dtypes float32] [--out-dir work_dirs/benchmark]
        [--max-cell-seconds S] [--time-budget S] [--memory-shapes ...]
        [--memory-batch-sizes ...] [--memory-targets ...] [--no-memory] [--no-scoring]
        [--no-macs] [--threads N] [--quick]

CONFIGs default to ``configs/baseline_vit-s_ade20k.py configs/fatr_ade20k.py``; the FIRST is
the reference of every speed-up. Pretrained weights are never loaded (speed does not depend on
them). Inputs are synthetic ADE20K-like images (``fatr_seg.datasets.synthetic``), normalised
with the config's mean/std.

What is measured, per (dtype, shape, batch, target):

* ``backbone``: ``model.backbone(x)`` (patch embedding, blocks with reduction, restoration);
* ``segmentor``: ``model.encode_decode(x, metas)``: backbone, decode head and the resize of
  the logits to the input size, i.e. mmseg's whole-image inference without data loading.

The configs run in alternation (A B A B ...), forward only, in ``torch.inference_mode``, after
``--warmup`` untimed rounds; ``--iters`` timed rounds give the median and IQR. CUDA runs under
``torch.autocast`` (bf16 and fp16 by default) with a synchronisation around every call.

Time limits: a cell whose estimated time exceeds ``--max-cell-seconds``, or that would end more
than ``--time-budget`` seconds after the start, is skipped and listed under ``skipped`` (never
silently dropped); cells run smallest first. The CPU defaults (240 s per cell, 1500 s in all,
then the memory probes) keep a default CPU run near 30 minutes; ``0`` lifts a limit.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak RSS of a fresh child
process per (config, target, shape, batch) (``VmHWM`` reset after the model is built, so it
measures the forward). Scoring: the HF-score paths (exact chunked with and without the
kernel's log-sum-exp, logit proxy, Triton on CUDA) are timed on the first FATR config's
activations at its first reduction layer, with the proxy's top-k agreement.

Outputs under ``--out-dir``: ``benchmark.json``, ``benchmark.md`` and ``speedup.png``
(speed-up vs tokens). ``--quick`` (CI): a tiny model (embed 64, 2 heads), shapes 64 and 128,
batch 1 and 2, 2 iterations.

JSON schema (``benchmark.json``)::

    {"schema": "fatr_seg.benchmark/1", "date": str, "command": str,
     "machine": {"platform": str, "cpu_count": int, "torch_threads": int, "device": str,
                 "load_avg": [float, float, float] | null},
     "versions": {"python": str, "torch": str, "mmseg": str | null, "triton": str | null},
     "settings": {"device": str, "dtypes": [str], "shapes": [[H, W]], "batch_sizes": [int],
                  "targets": [str], "iters": int, "warmup": int, "max_cell_seconds": float,
                  "time_budget": float, "quick": bool},
     "reference": str,                                  # name of the first config
     "configs": [{"name": str, "path": str, "reduction": dict | null}],
     "macs": [{"config": str, "shape": [H, W], "tokens": int,
               "backbone": int, "segmentor": int, "scoring": int, "dc_term": int}],
     "timing": [{"config": str, "target": "backbone" | "segmentor", "device": str,
                 "dtype": str, "shape": [H, W], "tokens": int, "batch": int, "iters": int,
                 "median_s": float, "q1_s": float, "q3_s": float, "iqr_s": float,
                 "images_per_s": {"median": float, "q1": float, "q3": float, "iqr": float},
                 "times_s": [float], "warmup_s": [float],
                 "speedup": float,          # reference median time / this median time
                 "speedup_paired": float,   # median over rounds of t_ref / t_this
                 "macs_ratio": float | null,          # this MACs / reference MACs
                 "speedup_per_ideal": float | null}], # speedup * macs_ratio (1.0 = ideal)
     "skipped": [{"kind": "timing" | "memory" | "scoring", "target": str, "dtype": str,
                  "shape": [H, W], "batch": int, "reason": str}],
     "memory": [{"config": str, "target": str, "device": str, "dtype": str, "shape": [H, W],
                 "tokens": int, "batch": int, "peak_bytes": int, "before_bytes": int,
                 "forward_bytes": int, "method": "cuda_max_memory_allocated" | "child_vmhwm"
                 | "child_maxrss", "error": str | null}],
     "scoring": [{"config": str, "layer": int, "device": str, "dtype": str, "shape": [H, W],
                  "tokens": int, "batch": int, "k": int, "num_patches": int,
                  "paths": {path: {"median_s": float, "q1_s": float, "q3_s": float,
                                   "iqr_s": float}},
                  "topk_agreement": {path: float}, "max_abs_diff": {path: float}}]}
"""

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import numpy as np
import torch

ROOT = osp.abspath(osp.join(osp.dirname(osp.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
from fatr_seg.analysis import (  # noqa: E402
    TimingStats,
    attention_stats_at,
    count_macs,
    cuda_peak_memory,
    current_rss_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    time_alternating,
    time_scoring_paths,
)
from fatr_seg.layers import FATRVisionTransformer  # noqa: E402

DEFAULT_CONFIGS = ["configs/baseline_vit-s_ade20k.py", "configs/fatr_ade20k.py"]
TARGETS = ("backbone", "segmentor")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK = dict(shapes=[(64, 64), (128, 128)], batch_sizes=[1, 2], iters=2, warmup=1)
# The tiny model of --quick: same depth and reduction layers, small width.
TINY_DIM, TINY_HEADS = 64, 2
PROBE_TAG = "FATR_MEMORY_PROBE "
MAX_DISTINCT_IMAGES = 8  # larger batches repeat them; content only matters for token selection


# ---------------------------------------------------------------------------------------- args
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark images/s, peak memory and scoring cost of segmentors "
        "(the first config is the reference).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("configs", nargs="*", help=f"config files (default: {DEFAULT_CONFIGS})")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
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
    p.add_argument("--out-dir", default="work_dirs/benchmark")
    p.add_argument(
        "--max-cell-seconds",
        type=float,
        default=None,
        help="skip a cell estimated to take longer (0: never skip; default 300 on "
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
    p.add_argument("--no-scoring", action="store_true", help="skip the scoring-path timing")
    p.add_argument("--no-macs", action="store_true", help="skip the MAC counts")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI mode: tiny model, shapes 64 128, batch 1 2, 2 iterations",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.memory_probe is not None:
        return args
    args.configs = args.configs or list(DEFAULT_CONFIGS)
    for path in args.configs:
        if not osp.isfile(path):
            p.error(f"config not found: {path}")
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
        p.error("on CPU only --dtypes float32 is benchmarked (the issue's setting)")
    if args.max_cell_seconds is None:
        args.max_cell_seconds = 600.0 if cuda else 240.0
    if args.time_budget is None:
        args.time_budget = 0.0 if cuda else 1500.0
    args.memory_shapes = args.memory_shapes or args.shapes
    args.memory_targets = args.memory_targets or args.targets
    args.memory_batch_sizes = sorted(
        set(args.memory_batch_sizes or (args.batch_sizes if cuda else [1]))
    )
    return args


# -------------------------------------------------------------------------------------- models
def _shrink(cfg) -> None:
    """Make the model of ``cfg`` tiny (--quick): same depth and reduction, width 64."""
    bb = cfg.model.backbone
    bb.embed_dims, bb.num_heads = TINY_DIM, TINY_HEADS
    head = cfg.model.decode_head
    for key, value in (
        ("in_channels", TINY_DIM),
        ("channels", TINY_DIM),
        ("embed_dims", TINY_DIM),
        ("num_heads", TINY_HEADS),
        ("num_layers", 1),
    ):
        if key in head:
            head[key] = value
    cfg.model.pop("auxiliary_head", None)


def build_segmentor(path: str, tiny: bool = False):
    """mmseg segmentor from a config, without pretrained weights, in eval mode, on CPU."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    cfg = Config.fromfile(path)
    if "model" not in cfg or "backbone" not in cfg.model:
        raise ValueError(f"{path} defines no model.backbone")
    cfg.model.pop("pretrained", None)
    cfg.model.backbone.init_cfg = None  # no weights here; speed does not depend on them
    if tiny:
        _shrink(cfg)
    init_default_scope(cfg.get("default_scope", "mmseg"))
    model = MODELS.build(cfg.model).eval()
    pre = cfg.model.get("data_preprocessor") or {}
    norm = (pre.get("mean", [127.5] * 3), pre.get("std", [127.5] * 3))
    return model, cfg, norm


def config_names(paths: list[str]) -> list[str]:
    names = [osp.splitext(osp.basename(p))[0] for p in paths]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def make_images(batch: int, shape: tuple[int, int], norm, seed: int) -> torch.Tensor:
    """Normalised synthetic images (B, 3, H, W), float32, on CPU."""
    from fatr_seg.datasets.synthetic import generate_sample

    distinct = []
    for i in range(min(batch, MAX_DISTINCT_IMAGES)):
        image, _ = generate_sample(np.random.default_rng([seed, i]), shape)
        distinct.append(torch.from_numpy(image).permute(2, 0, 1).float())
    x = torch.stack([distinct[i % len(distinct)] for i in range(batch)])
    mean = torch.tensor(norm[0], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(norm[1], dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def image_metas(batch: int, shape: tuple[int, int]) -> list[dict]:
    return [dict(img_shape=shape, ori_shape=shape, pad_shape=shape) for _ in range(batch)]


def forward_fn(model, target: str, x: torch.Tensor, dtype: str):
    """Zero-argument callable running one forward of ``target`` in inference mode."""
    metas = image_metas(x.shape[0], tuple(x.shape[2:]))
    autocast = x.is_cuda and dtype != "float32"

    def run():
        ctx = torch.autocast("cuda", DTYPES[dtype]) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            if target == "backbone":
                return model.backbone(x)
            return model.encode_decode(x, metas)

    return run


def _tokens(model, shape: tuple[int, int]) -> int:
    p = getattr(model.backbone, "patch_size", 16)
    p = p[0] if isinstance(p, tuple | list) else p
    return -(-shape[0] // p) * -(-shape[1] // p)


# --------------------------------------------------------------------------------- memory probe
def memory_probe(spec: dict) -> dict:
    """Child process: peak RSS of one forward (run by the parent through ``--memory-probe``)."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model, _, norm = build_segmentor(spec["config"], spec["tiny"])
    shape = tuple(spec["shape"])
    x = make_images(spec["batch"], shape, norm, spec["seed"])
    run = forward_fn(model, spec["target"], x, "float32")
    gc.collect()
    method = "child_vmhwm" if reset_peak_rss() else "child_maxrss"
    before = current_rss_bytes()
    run()
    peak = peak_rss_bytes()
    return dict(peak_bytes=peak, before_bytes=before, forward_bytes=peak - before, method=method)


def run_memory_probe(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, osp.abspath(__file__), "--memory-probe", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(error=f"memory probe timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_TAG):
            return json.loads(line[len(PROBE_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(error=f"memory probe failed (exit {proc.returncode}): {' | '.join(tail)}")


# ---------------------------------------------------------------------------------- benchmark
class Progress:
    """tqdm bar (or nothing) with a settable description."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _first_fatr(models: dict) -> str | None:
    for name, model in models.items():
        bb = model.backbone
        if isinstance(bb, FATRVisionTransformer) and bb.reduction and bb.reduction.method == "fatr":
            return name
    return None


def _machine(device: torch.device) -> dict:
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    name = platform.processor() or platform.machine()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return dict(
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=name,
        load_avg=load,
    )


def _versions() -> dict:
    out = dict(python=platform.python_version(), torch=torch.__version__, mmseg=None, triton=None)
    for key, mod in (("mmseg", "mmseg"), ("triton", "triton")):
        try:
            out[key] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def count_all_macs(models, names, shapes, targets, progress) -> list[dict]:
    """MACs (one image) of every config at every shape, counted on CPU."""
    rows = []
    for shape in shapes:
        x = torch.zeros(1, 3, *shape)
        for name in names:
            model = models[name]
            progress.describe(f"MACs {name} {shape[0]}x{shape[1]}")
            row = dict(config=name, shape=list(shape), tokens=_tokens(model, shape))
            back = count_macs(model.backbone, x)
            row.update(backbone=back.macs, scoring=back.scoring_macs, dc_term=back.dc_term_macs)
            if "segmentor" in targets:
                seg = count_macs(model, x, image_metas(1, shape), method="encode_decode")
                row["segmentor"] = seg.macs
            rows.append(row)
            progress.update()
    return rows


def _macs_of(macs_rows, name, shape, target):
    for r in macs_rows:
        if r["config"] == name and tuple(r["shape"]) == tuple(shape):
            return r.get(target)
    return None


class Budget:
    """Per-cell and whole-run time limits, with per-image time estimates.

    A cell is skipped (and listed) when its estimated time exceeds ``cell_s``, or when it would
    end after ``total_s`` seconds since the start. Estimates come from the same
    (dtype, target, shape) at a smaller batch, else from a smaller shape scaled by MACs, else
    from the warm-up.
    """

    def __init__(self, cell_s: float, total_s: float) -> None:
        self.cell_s = cell_s or math.inf
        self.total_s = total_s or math.inf
        self.start = time.perf_counter()
        self.per_image: dict = {}  # (dtype, target, shape) -> seconds per image, all configs
        self.macs: dict = {}  # (target, shape) -> reference MACs

    def estimate(self, dtype: str, target: str, shape, batch: int, rounds: int) -> float | None:
        key = (dtype, target, shape)
        if key in self.per_image:
            return rounds * batch * self.per_image[key]
        known = [
            k for k in self.per_image if k[:2] == (dtype, target) and (target, k[2]) in self.macs
        ]
        if (target, shape) in self.macs and known:
            prev = max(known, key=lambda k: self.macs[(target, k[2])])
            scale = self.macs[(target, shape)] / self.macs[(target, prev[2])]
            return rounds * batch * self.per_image[prev] * scale
        return None

    def reason(self, estimate: float | None) -> str | None:
        """Why a cell of this estimated duration must be skipped, or None."""
        if estimate is None:
            return None
        if estimate > self.cell_s:
            return f"estimated {estimate:.0f} s > --max-cell-seconds {self.cell_s:.0f}"
        left = self.total_s - (time.perf_counter() - self.start)
        if estimate > left:
            return (
                f"estimated {estimate:.0f} s > {max(left, 0):.0f} s left of --time-budget "
                f"{self.total_s:.0f}"
            )
        return None


class Bench:
    """One benchmark run: the models, the settings and the result being filled."""

    def __init__(self, args) -> None:
        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.names = config_names(args.configs)
        self.models, self.norms = {}, {}
        for name, path in zip(self.names, args.configs):
            self.models[name], _, self.norms[name] = build_segmentor(path, args.quick)
        self.ref = self.names[0]
        self.device = args.device
        self.fatr_name = None if args.no_scoring else _first_fatr(self.models)
        self.budget = Budget(args.max_cell_seconds, args.time_budget)
        self.progress = Progress(self._steps(), not args.no_progress)
        self.result = dict(
            schema="fatr_seg.benchmark/1",
            date=datetime.datetime.now().isoformat(timespec="seconds"),
            command=" ".join(["python tools/benchmark.py", *args.argv]),
            machine=_machine(self.device),
            versions=_versions(),
            settings=dict(
                device=str(self.device),
                dtypes=args.dtypes,
                shapes=[list(s) for s in args.shapes],
                batch_sizes=args.batch_sizes,
                targets=args.targets,
                iters=args.iters,
                warmup=args.warmup,
                max_cell_seconds=args.max_cell_seconds,
                time_budget=args.time_budget,
                quick=args.quick,
            ),
            reference=self.ref,
            configs=[
                dict(name=n, path=p, reduction=_reduction_dict(self.models[n]))
                for n, p in zip(self.names, args.configs)
            ],
            macs=[],
            timing=[],
            skipped=[],
            memory=[],
            scoring=[],
        )

    def _steps(self) -> int:
        a = self.args
        cells = len(a.dtypes) * len(a.shapes) * len(a.batch_sizes)
        steps = cells * len(a.targets) * (a.warmup + a.iters)
        steps += 0 if a.no_macs else len(a.shapes) * len(self.names)
        if not a.no_memory:
            probes = len(a.memory_shapes) * len(a.memory_batch_sizes) * len(a.memory_targets)
            steps += len(a.dtypes) * probes * len(self.names)
        return steps + (cells if self.fatr_name else 0)

    def run(self) -> dict:
        a = self.args
        # MACs first, on CPU (a Triton kernel launch would be invisible to the counter).
        if not a.no_macs:
            rows = count_all_macs(self.models, self.names, a.shapes, a.targets, self.progress)
            self.result["macs"] = rows
            for r in rows:
                if r["config"] == self.ref:
                    for target in TARGETS:
                        if target in r:
                            self.budget.macs[(target, tuple(r["shape"]))] = r[target]
        for model in self.models.values():
            model.to(self.device)
        for dtype in a.dtypes:
            for shape in a.shapes:
                for batch in a.batch_sizes:
                    x = make_images(batch, shape, self.norms[self.ref], a.seed).to(self.device)
                    for target in a.targets:
                        self.time_cell(target, dtype, shape, batch, x)
                    if self.fatr_name:
                        self.score_cell(dtype, shape, batch, x)
                    del x
        if not a.no_memory:
            self.memory()
        self.progress.close()
        return self.result

    def skip(self, kind, target, dtype, shape, batch, reason) -> None:
        self.result["skipped"].append(
            dict(
                kind=kind, target=target, dtype=dtype, shape=list(shape), batch=batch, reason=reason
            )
        )

    def time_cell(self, target, dtype, shape, batch, x) -> None:
        """Alternating timing of every config on one (target, dtype, shape, batch) cell."""
        a, budget = self.args, self.budget
        rounds = a.warmup + a.iters
        self.progress.describe(f"{target} {dtype} {shape[0]}x{shape[1]} b{batch}")
        reason = budget.reason(budget.estimate(dtype, target, shape, batch, rounds))
        if reason:
            self.skip("timing", target, dtype, shape, batch, reason)
            self.progress.update(rounds)
            return
        fns = {n: forward_fn(m, target, x, dtype) for n, m in self.models.items()}
        step = lambda _: self.progress.update()  # noqa: E731
        warm = {}
        if a.warmup:
            warm = time_alternating(fns, a.warmup, 0, x.device, on_round=step)
            per_round = sum(t[-1] for t in warm.values())
            budget.per_image.setdefault((dtype, target, shape), per_round / batch)
            reason = budget.reason(a.iters * per_round)
            if reason:
                self.skip("timing", target, dtype, shape, batch, f"after warm-up: {reason}")
                self.progress.update(a.iters)
                return
        times = time_alternating(fns, a.iters, 0, x.device, on_round=step)
        stats = {n: TimingStats.from_times(t) for n, t in times.items()}
        budget.per_image[(dtype, target, shape)] = sum(s.median_s for s in stats.values()) / batch
        ref_macs = _macs_of(self.result["macs"], self.ref, shape, target)
        for name, s in stats.items():
            macs = _macs_of(self.result["macs"], name, shape, target)
            speedup = stats[self.ref].median_s / s.median_s
            ratio = macs / ref_macs if (macs and ref_macs) else None
            paired = statistics.median(r / t for r, t in zip(times[self.ref], times[name]))
            row = dict(
                config=name,
                target=target,
                device=str(x.device),
                dtype=dtype,
                shape=list(shape),
                tokens=_tokens(self.models[self.ref], shape),
                batch=batch,
            )
            row.update(s.to_dict(batch))
            row.update(
                warmup_s=list(warm.get(name, [])),
                speedup=speedup,
                speedup_paired=paired,
                macs_ratio=ratio,
                speedup_per_ideal=speedup * ratio if ratio else None,
            )
            self.result["timing"].append(row)

    def score_cell(self, dtype, shape, batch, x) -> None:
        """HF-scoring paths on the first FATR config's first reduction layer."""
        a, budget = self.args, self.budget
        self.progress.describe(f"scoring {dtype} {shape[0]}x{shape[1]} b{batch}")
        vit = self.models[self.fatr_name].backbone
        layer, keep_ratio = vit.reduction.layers[0], vit.reduction.keep_ratio[0]
        reason = budget.reason(budget.estimate(dtype, "scoring", shape, batch, 1))
        if reason:
            self.skip("scoring", "scoring", dtype, shape, batch, reason)
            self.progress.update()
            return
        autocast = x.is_cuda and dtype != "float32"
        ctx = torch.autocast("cuda", DTYPES[dtype]) if autocast else contextlib.nullcontext()
        t0 = time.perf_counter()
        with torch.inference_mode(), ctx:
            stats, v = attention_stats_at(vit, x, layer)
        out = time_scoring_paths(stats, v, keep_ratio, a.iters, a.warmup)
        budget.per_image[(dtype, "scoring", shape)] = (time.perf_counter() - t0) / batch
        paths = {
            p: dict(median_s=s.median_s, q1_s=s.q1_s, q3_s=s.q3_s, iqr_s=s.iqr_s)
            for p, s in out["times"].items()
        }
        self.result["scoring"].append(
            dict(
                config=self.fatr_name,
                layer=layer,
                device=str(x.device),
                dtype=dtype,
                shape=list(shape),
                tokens=stats.q.shape[2] - 1,
                batch=batch,
                k=out["k"],
                num_patches=out["num_patches"],
                paths=paths,
                topk_agreement=out["topk_agreement"],
                max_abs_diff=out["max_abs_diff"],
            )
        )
        self.progress.update()

    def memory(self) -> None:
        """Peak memory of one forward per (config, target, shape, batch)."""
        a, device = self.args, self.device
        timeout = max(600.0, 4 * (a.max_cell_seconds or 600.0))
        for dtype in a.dtypes:
            for shape in a.memory_shapes:
                for batch in a.memory_batch_sizes:
                    x = None
                    for target in a.memory_targets:
                        for name, path in zip(self.names, a.configs):
                            self.progress.describe(
                                f"memory {name} {target} {shape[0]}x{shape[1]} b{batch}"
                            )
                            row = dict(
                                config=name,
                                target=target,
                                device=str(device),
                                dtype=dtype,
                                shape=list(shape),
                                tokens=_tokens(self.models[name], shape),
                                batch=batch,
                                error=None,
                            )
                            if device.type == "cuda":
                                if x is None:
                                    x = make_images(batch, shape, self.norms[self.ref], a.seed)
                                    x = x.to(device)
                                row.update(self._cuda_memory(name, target, x, dtype))
                            else:
                                spec = dict(
                                    config=osp.abspath(path),
                                    target=target,
                                    shape=list(shape),
                                    batch=batch,
                                    tiny=a.quick,
                                    threads=a.threads,
                                    seed=a.seed,
                                )
                                row.update(run_memory_probe(spec, timeout))
                            self.result["memory"].append(row)
                            self.progress.update()

    def _cuda_memory(self, name, target, x, dtype) -> dict:
        try:
            fn = forward_fn(self.models[name], target, x, dtype)
            return dict(cuda_peak_memory(fn, self.device), method="cuda_max_memory_allocated")
        except torch.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            return dict(error=f"out of memory: {str(err).splitlines()[0]}")


def benchmark(args) -> dict:
    """Run the benchmark described by parsed ``args``; returns the JSON-ready result."""
    return Bench(args).run()


def _reduction_dict(model) -> dict | None:
    red = getattr(model.backbone, "reduction", None)
    if red is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(red).items()}


# ------------------------------------------------------------------------------------ reports
def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def to_markdown(result: dict) -> str:
    s = result["settings"]
    m = result["machine"]
    lines = [
        f"# Benchmark {result['date']}",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {m['device']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, "
        f"load average at start {m['load_avg']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- device {s['device']}, dtypes {s['dtypes']}, {s['warmup']} warm-up + {s['iters']} "
        f"timed rounds, configs alternating; reference: `{result['reference']}`",
        "",
    ]
    if result["macs"]:
        lines += [
            "## MACs (one image)",
            "",
            "| config | shape | tokens | backbone GMACs | of which scoring | segmentor GMACs |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in result["macs"]:
            seg = r.get("segmentor")
            seg = "-" if seg is None else f"{seg / 1e9:.2f}"
            lines.append(
                f"| {r['config']} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} "
                f"| {r['backbone'] / 1e9:.2f} | {r['scoring'] / 1e9:.3f} "
                f"| {seg} |"
            )
        lines.append("")
    if result["timing"]:
        lines += [
            "## Throughput",
            "",
            "Images/s: median [q1, q3] over the timed rounds. speed-up: reference median time / "
            "this median time (paired: median of per-round ratios). ideal: the MACs ratio's "
            "inverse; speed-up/ideal = 1 means the MAC cut is fully realised.",
            "",
            "| target | dtype | shape | tokens | batch | config | images/s | speed-up | paired "
            "| ideal | speed-up/ideal |",
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in result["timing"]:
            ips = r["images_per_s"]
            ratio, per_ideal = r["macs_ratio"], r["speedup_per_ideal"]
            ideal = "-" if not ratio else f"{1 / ratio:.3f}"
            per_ideal = "-" if per_ideal is None else f"{per_ideal:.3f}"
            lines.append(
                f"| {r['target']} | {r['dtype']} | {r['shape'][0]}x{r['shape'][1]} "
                f"| {r['tokens']} | {r['batch']} | {r['config']} "
                f"| {ips['median']:.3f} [{ips['q1']:.3f}, {ips['q3']:.3f}] "
                f"| {r['speedup']:.3f} | {r['speedup_paired']:.3f} "
                f"| {ideal} | {per_ideal} |"
            )
        lines.append("")
    if result["skipped"]:
        lines += ["## Skipped", ""]
        for r in result["skipped"]:
            lines.append(
                f"- {r['kind']} {r['target']} {r['dtype']} {r['shape'][0]}x{r['shape'][1]} "
                f"batch {r['batch']}: {r['reason']}"
            )
        lines.append("")
    if result["memory"]:
        lines += [
            "## Peak memory (MiB)",
            "",
            "CPU: peak RSS of a fresh child process during one forward (peak) and its growth "
            "over the RSS before the forward (forward). CUDA: max_memory_allocated.",
            "",
            "| target | dtype | shape | tokens | batch | config | peak | before | forward |",
            "|---|---|---|---:|---:|---|---:|---:|---:|",
        ]
        for r in result["memory"]:
            if r.get("error"):
                tail = f"| error: {r['error']} | | |"
            else:
                tail = (
                    f"| {_fmt_bytes(r['peak_bytes'])} | {_fmt_bytes(r['before_bytes'])} "
                    f"| {_fmt_bytes(r['forward_bytes'])} |"
                )
            lines.append(
                f"| {r['target']} | {r['dtype']} | {r['shape'][0]}x{r['shape'][1]} "
                f"| {r['tokens']} | {r['batch']} | {r['config']} {tail}"
            )
        lines.append("")
    if result["scoring"]:
        lines += [
            "## HF scoring paths",
            "",
            "Median ms per call on the activations of the first reduction layer; top-k "
            "agreement with the exact score (k = kept tokens).",
            "",
            "| dtype | shape | tokens | batch | attention | exact (lse) | exact | triton "
            "| logit proxy | proxy top-k agreement |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["scoring"]:

            def ms(path, r=r):
                t = r["paths"].get(path)
                return "-" if t is None else f"{1e3 * t['median_s']:.2f}"

            lines.append(
                f"| {r['dtype']} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {r['batch']} "
                f"| {ms('attention')} | {ms('exact_chunked_lse')} | {ms('exact_chunked')} "
                f"| {ms('exact_triton')} | {ms('logit_proxy')} "
                f"| {r['topk_agreement']['logit_proxy']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_speedup(result: dict, path: str) -> None:
    """Speed-up vs tokens, one line per (config, target, batch, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict = {}
    for r in result["timing"]:
        if r["config"] == result["reference"]:
            continue
        key = (r["config"], r["target"], r["batch"], r["dtype"])
        series.setdefault(key, []).append((r["tokens"], r["speedup"]))
    for (name, target, batch, dtype), pts in sorted(series.items()):
        pts.sort()
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            label=f"{name} {target} b{batch} {dtype}",
        )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("patch tokens")
    ax.set_ylabel(f"speed-up vs {result['reference']}")
    ax.set_title(f"{result['machine']['device']} ({result['settings']['device']})")
    if series:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no timed cells", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_probe is not None:
        print(PROBE_TAG + json.dumps(memory_probe(json.loads(args.memory_probe))), flush=True)
        return 0
    result = benchmark(args)
    os.makedirs(args.out_dir, exist_ok=True)
    paths = {
        k: osp.join(args.out_dir, f)
        for k, f in (("json", "benchmark.json"), ("md", "benchmark.md"), ("png", "speedup.png"))
    }
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    markdown = to_markdown(result)
    with open(paths["md"], "w") as f:
        f.write(markdown + "\n")
    plot_speedup(result, paths["png"])
    print(markdown)
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
