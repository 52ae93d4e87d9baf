"""The GPU benchmark behind ``tools/gpu_bench.sh``: ViT-S Segmenter, baseline vs FATR, on CUDA.

torch and timm only (no mmcv, mmseg or mmengine), so it runs on a bare GPU machine: the models of
``configs/baseline_vit-s_ade20k.py`` and ``configs/fatr_ade20k.py`` built from
``fatr_seg.layers`` (a test checks them against the configs). Per size, target and mode
(``eager``; ``cudagraph``: eager's kernels replayed; ``compiled``: as ``tools/test.py
--compile``) the models run in alternation through the benchmark core, under autocast.
``--dry-run`` runs the same logic on a tiny model (``--device cpu --dry-run``: without a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os.path as osp
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import FATRVisionTransformer, MaskTransformerHead
from ..layers.config import REDUCTION_DEFAULTS
from .benchmark import Budget, result_header, timed_cell
from .benchmark_models import DTYPES
from .store import write_files
from .tables import fmt, markdown_table
from .timing import cuda_peak_memory, peak_tensor_bytes, synchronize

__all__ = ["MODELS", "PEERS", "build_models", "compiled_parts", "main", "profile_table", "run",
           "to_markdown", "write"]  # fmt: skip

# ViT-S/16 Segmenter-Mask of the ADE20K configs: backbone kwargs, and the head's.
VIT_S = dict(patch_size=16, embed_dims=384, num_layers=12, num_heads=6, mlp_ratio=4.0)
HEAD_S = dict(num_classes=150, num_layers=2, num_heads=6, embed_dims=384)
TINY = dict(patch_size=16, embed_dims=32, num_layers=12, num_heads=2, mlp_ratio=4.0)
TINY_HEAD = dict(num_classes=150, num_layers=1, num_heads=2, embed_dims=32)
#: Model name -> reduction (None: the baseline).
MODELS = {"baseline": None, "fatr": dict(REDUCTION_DEFAULTS)}
#: ``--peers``: the CamVid frontier's ToMe and ALGM rows nearest the default (keep 0.5, 0.58).
PEERS = {"tome": dict(method="tome", keep_ratio=0.5), "algm": dict(method="algm", keep_ratio=0.58)}
#: Modes, in their default order: eager, the eager kernels replayed from a CUDA graph, compiled.
MODES = ("eager", "cudagraph", "compiled")


class Segmentor(nn.Module):
    """Backbone, mask head, and the resize of the logits to the input (mmseg's encode_decode)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resize(self.head(self.backbone(x)), x)

    @staticmethod
    def resize(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The logits bilinearly resized to the input's size, as mmseg's ``predict_by_feat``."""
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


def build_models(tiny: bool = False, peers: bool = False) -> dict[str, Segmentor]:
    """The baseline, FATR (and :data:`PEERS`) segmentors, eval mode, the same random weights;
    the positional embedding stored for the configs' 512² crops (64² for ``tiny``)."""
    vit, head = (TINY, TINY_HEAD) if tiny else (VIT_S, HEAD_S)
    img_size = 64 if tiny else 512
    models = {}
    for name, reduction in {**MODELS, **(PEERS if peers else {})}.items():
        torch.manual_seed(0)
        backbone = FATRVisionTransformer(img_size=img_size, reduction=reduction,
                                         compact_output=True, **vit)  # fmt: skip
        models[name] = Segmentor(backbone, MaskTransformerHead(vit["embed_dims"], **head)).eval()
    return models


def compiled_parts(model: Segmentor, backend: str) -> tuple[Callable, Callable]:
    """Backbone and head through ``torch.compile(fullgraph=True, dynamic=False)``, one graph
    each; made once per model, so each input size compiles once for both targets."""
    options = dict(fullgraph=True, dynamic=False, backend=backend)
    return torch.compile(model.backbone, **options), torch.compile(model.head, **options)


def _callables(model: Segmentor, target: str, x, dtype, mode: str, backend: str,
               compiled: tuple[Callable, Callable] | None = None):  # fmt: skip
    fn: Callable = model.backbone if target == "backbone" else model
    if mode == "compiled":  # backbone and head one graph each, the resize eager (as --compile)
        backbone, head = compiled or compiled_parts(model, backend)
        fn = backbone
        if target == "segmentor":
            fn = lambda x: model.resize(head(backbone(x)), x)  # noqa: E731
    autocast = x.is_cuda and dtype != torch.float32
    graphed = mode == "cudagraph"

    def call():
        # CUDA graphs need autocast's cast cache off (torch.cuda.graph's documentation).
        ctx = (torch.autocast("cuda", dtype, cache_enabled=not graphed) if autocast
               else contextlib.nullcontext())  # fmt: skip
        with torch.inference_mode(), ctx:
            return fn(x)

    return _cuda_graph(call, x.device) if graphed else call


def _cuda_graph(call: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``call`` captured once in a CUDA graph; the returned callable replays it."""
    if device.type != "cuda":
        raise RuntimeError("the cudagraph mode needs a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capture stream: kernel choices, autotuning
        for _ in range(2):
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()

    def replay():
        graph.replay()
        return out

    return replay


def _memory(fn, device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_peak_memory(fn, device)["forward_bytes"]
    return peak_tensor_bytes(fn)


def run(args, on_cell: Callable[[dict], None] | None = None) -> dict:
    """Measure every (mode, shape, target) cell; the JSON-ready result. ``on_cell`` gets the
    result after every cell, so that a run stopped from outside leaves every finished cell."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    budget = Budget(0, args.time_budget)
    models = {n: m.to(device) for n, m in build_models(args.dry_run, args.peers).items()}
    compiled = {n: compiled_parts(m, args.compile_backend) for n, m in models.items()}
    keys = ("dtype", "batch", "iters", "warmup", "dry_run", "compile_backend", "peers")
    result = dict(
        **result_header("fatr_seg.gpu_bench/1", args, device, keys),
        rows=[],
        skipped=[],
    )
    for mode in args.modes:
        for size in args.shapes:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(args.batch, 3, size, size, generator=gen).to(device)
            for target in args.targets:
                reason = budget.reason(0)
                if reason is None and mode == "cudagraph" and device.type != "cuda":
                    reason = "CUDA graphs need a CUDA device"
                if reason is None:
                    try:
                        profiles = [] if args.profile else None
                        result["rows"] += _cell(models, target, x, dtype, mode, args, compiled,
                                                profiles)  # fmt: skip
                        if profiles:
                            result.setdefault("profiles", []).extend(profiles)
                    except Exception as err:  # noqa: BLE001 - one failed cell must not end the run
                        reason = f"error: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
                        traceback.print_exc()  # the whole story, for the log
                if reason is not None:
                    result["skipped"].append(
                        dict(mode=mode, shape=size, target=target, reason=reason)
                    )
                if on_cell is not None:
                    result["seconds"] = time.perf_counter() - start
                    on_cell(result)
            del x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - start
    return result


def profile_table(fn: Callable[[], object], device: torch.device, rows: int = 30) -> str:
    """One call of ``fn`` under ``torch.profiler``: its ops by self time (the kernels' on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)


def _cell(models, target, x, dtype, mode, args, compiled=None, profiles=None) -> list[dict]:
    fns, first_s = {}, {}
    for name, model in models.items():
        parts = compiled[name] if compiled else None
        fns[name] = _callables(model, target, x, dtype, mode, args.compile_backend, parts)
        t0 = time.perf_counter()
        fns[name]()  # compiles in compiled mode
        synchronize(x.device)
        first_s[name] = time.perf_counter() - t0
    cell = timed_cell(fns, "baseline", args.iters, args.warmup, x.device)
    for name, fn in fns.items() if profiles is not None else ():
        profiles.append(f"==== {mode} {target} {x.shape[2]}² batch {x.shape[0]} {name}\n"
                        + profile_table(fn, x.device))  # fmt: skip
    return [dict(
        shape=x.shape[2], tokens=(x.shape[2] // 16) ** 2, target=target, mode=mode, model=name,
        batch=x.shape[0], median_ms=c["stats"].median_s * 1e3, q1_ms=c["stats"].q1_s * 1e3,
        q3_ms=c["stats"].q3_s * 1e3, images_per_s=x.shape[0] / c["stats"].median_s,
        speedup=c["speedup"],
        # A graph's memory is its pool, taken at capture: a replay allocates nothing.
        peak_mib=None if mode == "cudagraph" else _memory(fns[name], x.device) / 2**20,
        first_call_s=first_s[name]) for name, c in cell.items()]  # fmt: skip


def to_markdown(result: dict) -> str:
    """The result as a markdown table (one row per shape, target, mode and model)."""
    m, v, s = result["machine"], result["versions"], result["settings"]
    header = ["size", "tokens", "target", "mode", "model", "ms / batch (median [q1, q3])",
              "images/s", "speed-up vs baseline", "peak MiB", "first call s"]  # fmt: skip
    rows = [[f"{r['shape']}²", r["tokens"], r["target"], r["mode"], r["model"],
             f"{r['median_ms']:.1f} [{r['q1_ms']:.1f}, {r['q3_ms']:.1f}]",
             f"{r['images_per_s']:.1f}", f"{r['speedup']:.3f}", fmt(r["peak_mib"], ",.1f", "-"),
             f"{r['first_call_s']:.1f}"] for r in result["rows"]]  # fmt: skip
    return "\n".join([
        f"# GPU benchmark {result['date']}", "", f"- command: `{result['command']}`",
        f"- device: {m['device']}, torch {v['torch']}, CUDA {v['cuda']}, {m['platform']}",
        f"- {s['dtype']} (autocast on CUDA), batch {s['batch']}, {s['warmup']} warm-up + "
        f"{s['iters']} timed rounds, models alternating; compiled: torch.compile(fullgraph=True,"
        f" backend={s['compile_backend']!r}); dry run: {s['dry_run']}; {result['seconds']:.0f} s",
        "", markdown_table(header, rows, ["right", "right"] + ["left"] * 3 + ["right"] * 5),
    ] + [f"- skipped {r['mode']} {r['target']} at {r['shape']}²: {r['reason']}"
         for r in result["skipped"]]) + "\n"  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ViT-S Segmenter on a GPU: baseline vs FATR, bf16, "
                                "eager and compiled (see tools/gpu_bench.sh)")  # fmt: skip
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --dry-run)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")  # fmt: skip
    p.add_argument("--batch", type=int, default=None, help="images per call (default 32)")
    p.add_argument("--shapes", type=int, nargs="+", default=None,
                   help="square input sizes (default 512 1024: 1024 and 4096 tokens)")  # fmt: skip
    p.add_argument("--targets", nargs="+", choices=("backbone", "segmentor"),
                   default=["backbone", "segmentor"])  # fmt: skip
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="modes to run, in this order (cudagraph: the eager forward captured in a "
                   "CUDA graph and replayed; CUDA only)")  # fmt: skip
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--peers", action="store_true", help="also ToMe keep 0.5 and ALGM keep 0.58")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="skip cells that would start later (seconds; 0: none)")  # fmt: skip
    p.add_argument("--profile", action="store_true",
                   help="also profile one call per cell and model (torch.profiler; op and "
                   "kernel times) into profiles.txt")  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="tiny model, sizes 64 96, batch 2, 1 round: tests the logic")  # fmt: skip
    p.add_argument("--out-dir", default="work_dirs/gpu_bench", help="gpu_bench.{md,json}")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python -m fatr_seg.analysis.gpu_bench", *given])
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (use --device cpu --dry-run to test)")
    if not args.device.startswith("cuda") and not args.dry_run:
        p.error("on CPU only --dry-run is supported; the CPU benchmark is tools/benchmark.py")
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batch = args.batch or (2 if args.dry_run else 32)
    args.shapes = args.shapes or ([64, 96] if args.dry_run else [512, 1024])
    args.iters = args.iters or (1 if args.dry_run else 20)
    args.warmup = (1 if args.dry_run else 3) if args.warmup is None else args.warmup
    return args


def write(result: dict, out_dir: str) -> str:
    """``gpu_bench.md``, ``gpu_bench.json`` (and ``profiles.txt``) in ``out_dir``; returns the
    markdown."""
    markdown = to_markdown(result)
    write_files(out_dir, "gpu_bench", {k: v for k, v in result.items() if k != "profiles"},
                markdown, indent=1)  # fmt: skip
    if result.get("profiles"):
        with open(osp.join(out_dir, "profiles.txt"), "w") as f:
            f.write("\n".join(result["profiles"]))
    return markdown


def _progress(out_dir: str) -> Callable[[dict], None]:
    """After each cell: its rows (or why it was skipped) on stdout, and the files rewritten."""
    shown = dict(rows=0, skipped=0)

    def on_cell(result: dict) -> None:
        for r in result["rows"][shown["rows"] :]:
            mib = fmt(r["peak_mib"], ",.1f", "-")
            print(f"[{result['seconds']:.0f} s] {r['mode']} {r['target']} {r['shape']}² "
                  f"{r['model']}: {r['median_ms']:.1f} ms, {r['speedup']:.3f}x, {mib} MiB, "
                  f"first call {r['first_call_s']:.1f} s")  # fmt: skip
        for r in result["skipped"][shown["skipped"] :]:
            print(f"[{result['seconds']:.0f} s] skipped {r['mode']} {r['target']} "
                  f"{r['shape']}²: {r['reason']}")  # fmt: skip
        shown.update(rows=len(result["rows"]), skipped=len(result["skipped"]))
        write(result, out_dir)

    return on_cell


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args, _progress(args.out_dir))
    markdown = write(result, args.out_dir)
    print(markdown)
    print(f"wrote {args.out_dir}/gpu_bench.md and gpu_bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
