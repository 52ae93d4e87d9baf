"""The benchmark run behind ``tools/benchmark.py``: throughput, peak memory, scoring cost, MACs.

:func:`benchmark` takes the tool's parsed settings and returns the JSON-ready result (schema
``fatr_seg.benchmark/1``, documented in ``tools/benchmark.py``). Configs run in alternation
(:func:`fatr_seg.analysis.timing.time_alternating`) cell by cell, smallest first, under the
per-cell and whole-run time limits of :class:`Budget`; a skipped cell is listed, never dropped.
Segmentors, inputs, forward passes and the CPU memory probe are in
:mod:`fatr_seg.analysis.benchmark_models`; the markdown table and the plot in
:mod:`fatr_seg.analysis.benchmark_report`.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import os.path as osp
import platform
import statistics
import sys
import time

import torch

from ..layers.vit import FATRVisionTransformer
from .benchmark_models import (
    COMPILED,
    DTYPES,
    build_segmentor,
    compiled_forward_fn,
    config_variants,
    forward_fn,
    image_metas,
    make_images,
    make_labels,
    patch_tokens,
    run_memory_probe,
)
from .flops import count_macs
from .timing import (
    TimingStats,
    attention_stats_at,
    cuda_peak_memory,
    time_alternating,
    time_scoring_paths,
)

__all__ = [
    "DEFAULT_TARGETS",
    "TARGETS",
    "Bench",
    "Budget",
    "Progress",
    "benchmark",
    "count_all_macs",
    "environment",
    "result_header",
]

TARGETS = ("backbone", "segmentor", "train")
# What is timed when --targets is not given; a training step is opt-in (about 3x a forward).
DEFAULT_TARGETS = ("backbone", "segmentor")


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


def result_header(schema: str, args, device: torch.device, keys) -> dict:
    """The head of a benchmark's result: ``schema``, date, command line, machine, versions, and
    ``settings``: the device, the input shapes and the options ``keys`` of ``args``."""
    settings = dict(device=str(device), shapes=[list(s) if isinstance(s, tuple) else s
                                                for s in args.shapes])  # fmt: skip
    settings.update({k: getattr(args, k, False) for k in keys})
    return dict(schema=schema, date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=args.command, **environment(device), settings=settings)  # fmt: skip


def environment(device: torch.device) -> dict:
    """``machine`` and ``versions`` of a result: where and with what it was measured."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    name = platform.processor() or platform.machine()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    versions = dict(python=platform.python_version(), torch=torch.__version__,
                    cuda=torch.version.cuda, mmseg=None, triton=None)  # fmt: skip
    for key in ("mmseg", "triton"):
        try:
            versions[key] = __import__(key).__version__
        except ImportError:
            pass
    machine = dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                   torch_threads=torch.get_num_threads(), device=name, load_avg=load)  # fmt: skip
    return dict(machine=machine, versions=versions)


def count_all_macs(models, names, shapes, targets, progress) -> list[dict]:
    """MACs (one image) of every config at every shape, counted on CPU."""
    rows = []
    for shape in shapes:
        x = torch.zeros(1, 3, *shape)
        for name in names:
            model = models[name]
            progress.describe(f"MACs {name} {shape[0]}x{shape[1]}")
            row = dict(config=name, shape=list(shape), tokens=patch_tokens(model, shape))
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
        """Why a cell of this estimated duration must be skipped, or None (``estimate`` None:
        unknown; 0: only whether the whole-run limit is already spent)."""
        if estimate is None:
            return None
        if estimate > self.cell_s:
            return f"estimated {estimate:.0f} s > --max-cell-seconds {self.cell_s:.0f}"
        left = self.total_s - (time.perf_counter() - self.start)
        if left <= 0:
            return f"--time-budget {self.total_s:.0f} s spent"
        if estimate > left:
            return (
                f"estimated {estimate:.0f} s > {left:.0f} s left of --time-budget "
                f"{self.total_s:.0f}"
            )
        return None


class Bench:
    """One benchmark run: the models, the settings and the result being filled.

    ``args`` holds the settings of ``tools/benchmark.py`` after its defaults are applied:
    ``configs``, ``targets``, ``shapes`` ([(H, W)]), ``batch_sizes``, ``iters``, ``warmup``,
    ``device`` (a ``torch.device``), ``dtypes``, ``max_cell_seconds``, ``time_budget``,
    ``memory_shapes``, ``memory_batch_sizes``, ``memory_targets``, ``no_memory``,
    ``no_scoring``, ``no_macs``, ``threads``, ``seed``, ``quick``, ``no_progress``,
    ``keep_ratio`` (budgets: one model per budget of each config with a reduction, see
    :func:`~fatr_seg.analysis.benchmark_models.config_variants`; None: the configs' own),
    ``compile`` (also time every config through ``torch.compile``, as ``NAME+compile``),
    ``cpu_time`` (time calls by the calling thread's CPU time) and ``command`` (the command line
    recorded in the result).
    """

    def __init__(self, args) -> None:
        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.entries = config_variants(args.configs, getattr(args, "keep_ratio", None))
        self.names = [name for name, _, _ in self.entries]
        self.models, self.norms = {}, {}
        for name, path, ratio in self.entries:
            model, _, self.norms[name] = build_segmentor(path, args.quick, keep_ratio=ratio)
            self.models[name] = model
        self.ref = self.names[0]
        self.device = args.device
        self.fatr_name = None if args.no_scoring else _first_fatr(self.models)
        self.budget = Budget(args.max_cell_seconds, args.time_budget)
        self.progress = Progress(self._steps(), not args.no_progress)
        keys = ("dtypes", "batch_sizes", "targets", "iters", "warmup", "max_cell_seconds",
                "time_budget", "quick", "compile", "cpu_time")  # fmt: skip
        self.result = dict(
            **result_header("fatr_seg.benchmark/1", args, self.device, keys),
            reference=self.ref,
            configs=[
                dict(name=n, path=p, reduction=_reduction_dict(self.models[n]))
                for n, p, _ in self.entries
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
                    labels = make_labels(batch, shape, a.seed) if "train" in a.targets else None
                    for target in a.targets:
                        self.time_cell(target, dtype, shape, batch, x, labels)
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

    def time_cell(self, target, dtype, shape, batch, x, labels=None) -> None:
        """Alternating timing of every config on one (target, dtype, shape, batch) cell."""
        a, budget = self.args, self.budget
        rounds = a.warmup + a.iters
        self.progress.describe(f"{target} {dtype} {shape[0]}x{shape[1]} b{batch}")
        reason = budget.reason(budget.estimate(dtype, target, shape, batch, rounds))
        if reason:
            self.skip("timing", target, dtype, shape, batch, reason)
            self.progress.update(rounds)
            return
        fns = {n: forward_fn(m, target, x, dtype, labels) for n, m in self.models.items()}
        compile_s = {}
        if getattr(a, "compile", False) and target != "train":
            # Compiled twins, timed in the same alternation; compilation itself is untimed.
            for n, m in self.models.items():
                fns[n + COMPILED], compile_s[n + COMPILED] = compiled_forward_fn(
                    m, target, x, dtype
                )
        step = lambda _: self.progress.update()  # noqa: E731
        clock = time.thread_time if getattr(a, "cpu_time", False) else time.perf_counter
        warm = {}
        if a.warmup:
            warm = time_alternating(fns, a.warmup, 0, x.device, on_round=step, clock=clock)
            per_round = sum(t[-1] for t in warm.values())
            budget.per_image.setdefault((dtype, target, shape), per_round / batch)
            reason = budget.reason(a.iters * per_round)
            if reason:
                self.skip("timing", target, dtype, shape, batch, f"after warm-up: {reason}")
                self.progress.update(a.iters)
                return
        times = time_alternating(fns, a.iters, 0, x.device, on_round=step, clock=clock)
        stats = {n: TimingStats.from_times(t) for n, t in times.items()}
        budget.per_image[(dtype, target, shape)] = sum(s.median_s for s in stats.values()) / batch
        ref_macs = _macs_of(self.result["macs"], self.ref, shape, target)
        for name, s in stats.items():
            macs = _macs_of(self.result["macs"], name.removesuffix(COMPILED), shape, target)
            speedup = stats[self.ref].median_s / s.median_s
            # Against the reference run the same way (compiled vs compiled, eager vs eager).
            same_mode = self.ref + COMPILED if name.endswith(COMPILED) else self.ref
            ratio = macs / ref_macs if (macs and ref_macs) else None
            paired = statistics.median(r / t for r, t in zip(times[self.ref], times[name]))
            row = dict(
                config=name,
                target=target,
                device=str(x.device),
                dtype=dtype,
                shape=list(shape),
                tokens=patch_tokens(self.models[self.ref], shape),
                batch=batch,
            )
            row.update(s.to_dict(batch))
            row.update(
                warmup_s=list(warm.get(name, [])),
                speedup=speedup,
                speedup_paired=paired,
                macs_ratio=ratio,
                speedup_per_ideal=speedup * ratio if ratio else None,
                compiled=name.endswith(COMPILED),
                compile_s=compile_s.get(name),
                speedup_same_mode=stats[same_mode].median_s / s.median_s,
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
                    x = labels = None
                    for target in a.memory_targets:
                        for name, path, ratio in self.entries:
                            self.progress.describe(
                                f"memory {name} {target} {shape[0]}x{shape[1]} b{batch}"
                            )
                            row = dict(
                                config=name,
                                target=target,
                                device=str(device),
                                dtype=dtype,
                                shape=list(shape),
                                tokens=patch_tokens(self.models[name], shape),
                                batch=batch,
                                error=None,
                            )
                            if device.type == "cuda":
                                if x is None:
                                    x = make_images(batch, shape, self.norms[self.ref], a.seed)
                                    x = x.to(device)
                                    if "train" in a.memory_targets:
                                        labels = make_labels(batch, shape, a.seed)
                                row.update(self._cuda_memory(name, target, x, dtype, labels))
                            else:
                                spec = dict(
                                    config=osp.abspath(path),
                                    target=target,
                                    shape=list(shape),
                                    batch=batch,
                                    tiny=a.quick,
                                    threads=a.threads,
                                    seed=a.seed,
                                    keep_ratio=ratio,
                                )
                                row.update(run_memory_probe(spec, timeout))
                            self.result["memory"].append(row)
                            self.progress.update()

    def _cuda_memory(self, name, target, x, dtype, labels) -> dict:
        try:
            fn = forward_fn(self.models[name], target, x, dtype, labels)
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
