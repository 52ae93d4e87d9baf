"""The benchmark core shared by ``tools/benchmark.py`` and ``tools/gpu_bench.sh``
(:func:`result_header`, :func:`timed_cell`, :class:`Budget`), and the run of
``tools/benchmark.py`` (:class:`Bench`; schema ``fatr_seg.benchmark/1``, documented there);
its report is :mod:`.benchmark_report`.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import math
import os
import os.path as osp
import platform
import statistics
import sys
import time

import torch

from .benchmark_models import (
    COMPILED,
    build_segmentor,
    compiled_forward_fn,
    config_variants,
    forward_fn,
    make_images,
    make_labels,
    patch_tokens,
    run_memory_probe,
    segmentor_macs,
)
from .timing import TimingStats, cuda_peak_memory, time_alternating

__all__ = ["DEFAULT_TARGETS", "TARGETS", "Bench", "Budget", "benchmark", "result_header",
           "timed_cell"]  # fmt: skip

TARGETS = ("backbone", "segmentor", "train")
# What is timed when --targets is not given; a training step is opt-in (about 3x a forward).
DEFAULT_TARGETS = ("backbone", "segmentor")


def result_header(schema: str, args, device: torch.device, keys) -> dict:
    """``schema``, date, command line, ``machine``, ``versions`` and ``settings`` (the device,
    the input shapes and the options ``keys`` of ``args``) of a benchmark's result."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())  # fmt: skip
    versions = dict(python=platform.python_version(), torch=torch.__version__,
                    cuda=torch.version.cuda, mmseg=None, triton=None)  # fmt: skip
    for key in ("mmseg", "triton"):
        with contextlib.suppress(ImportError):
            versions[key] = __import__(key).__version__
    machine = dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                   torch_threads=torch.get_num_threads(), device=name, load_avg=load)  # fmt: skip
    settings = dict(device=str(device), shapes=[list(s) if isinstance(s, tuple) else s
                                                for s in args.shapes])  # fmt: skip
    settings.update({k: getattr(args, k, False) for k in keys})
    return dict(schema=schema, date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=args.command, machine=machine, versions=versions,
                settings=settings)  # fmt: skip


def timed_cell(fns: dict, ref: str, iters: int, warmup: int, device,
               on_round=None, clock=time.perf_counter) -> dict[str, dict]:  # fmt: skip
    """Time ``fns`` in alternation; per name its ``stats``, ``speedup`` against ``ref`` and
    ``speedup_paired`` (median of per-round ratios, robust to drift between rounds)."""
    times = time_alternating(fns, iters, warmup, device, on_round=on_round, clock=clock)
    stats = {n: TimingStats.from_times(t) for n, t in times.items()}
    return {n: dict(stats=s, speedup=stats[ref].median_s / s.median_s,
                    speedup_paired=statistics.median(r / t for r, t in zip(times[ref], times[n])))
            for n, s in stats.items()}  # fmt: skip


class Budget:
    """Per-cell and whole-run time limits: a cell is skipped (and listed) when its estimated time
    exceeds ``cell_s`` or would end after ``total_s`` since the start. Estimates: the same (dtype,
    target, shape) at a smaller batch, else a smaller shape scaled by MACs, else the warm-up."""

    def __init__(self, cell_s: float, total_s: float) -> None:
        self.cell_s, self.total_s = cell_s or math.inf, total_s or math.inf
        self.start = time.perf_counter()
        self.per_image: dict = {}  # (dtype, target, shape) -> seconds per image, all configs
        self.macs: dict = {}  # (target, shape) -> reference MACs

    def estimate(self, dtype: str, target: str, shape, batch: int, rounds: int) -> float | None:
        key = (dtype, target, shape)
        if key in self.per_image:
            return rounds * batch * self.per_image[key]
        known = [k for k in self.per_image
                 if k[:2] == (dtype, target) and (target, k[2]) in self.macs]  # fmt: skip
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
            return f"estimated {estimate:.0f} s > {left:.0f} s left of --time-budget " \
                   f"{self.total_s:.0f}"  # fmt: skip
        return None


class Bench:
    """One run of ``tools/benchmark.py`` (``args``: its settings, defaults applied): the models,
    and the result being filled."""

    def __init__(self, args) -> None:
        from tqdm import tqdm

        if args.threads:
            torch.set_num_threads(args.threads)
        self.args, self.device = args, args.device
        self.entries = config_variants(args.configs, args.keep_ratio)
        self.models, self.norms = {}, {}
        for name, path, ratio in self.entries:
            self.models[name], _, self.norms[name] = build_segmentor(path, args.quick,
                                                                     keep_ratio=ratio)  # fmt: skip
        self.ref = self.entries[0][0]
        self.budget = Budget(args.max_cell_seconds, args.time_budget)
        self.progress = tqdm(total=self._steps(), unit="step", dynamic_ncols=True,
                             file=sys.stderr, disable=args.no_progress)  # fmt: skip
        keys = ("dtypes", "batch_sizes", "targets", "iters", "warmup", "max_cell_seconds",
                "time_budget", "quick", "compile", "cpu_time")  # fmt: skip
        self.result = dict(
            **result_header("fatr_seg.benchmark/1", args, self.device, keys), reference=self.ref,
            configs=[dict(name=n, path=p, reduction=_reduction_dict(self.models[n]))
                     for n, p, _ in self.entries],
            macs=[], timing=[], skipped=[], memory=[])  # fmt: skip

    def _steps(self) -> int:
        a = self.args
        cells = len(a.dtypes) * len(a.shapes) * len(a.batch_sizes)
        steps = cells * len(a.targets) * (a.warmup + a.iters)
        steps += 0 if a.no_macs else len(a.shapes) * len(self.models)
        if not a.no_memory:
            probes = len(a.memory_shapes) * len(a.memory_batch_sizes) * len(a.memory_targets)
            steps += len(a.dtypes) * probes * len(self.models)
        return steps

    def _row(self, name, target, dtype, shape, batch, **more) -> dict:
        return dict(config=name, target=target, device=str(self.device), dtype=dtype,
                    shape=list(shape), tokens=patch_tokens(self.models[name.removesuffix(
                        COMPILED)], shape), batch=batch, **more)  # fmt: skip

    def run(self) -> dict:
        a = self.args
        if not a.no_macs:  # on CPU, before the models move: a Triton launch escapes the counter
            self.count_macs()
        for model in self.models.values():
            model.to(self.device)
        for dtype, shape, batch in itertools.product(a.dtypes, a.shapes, a.batch_sizes):
            x = make_images(batch, shape, self.norms[self.ref], a.seed).to(self.device)
            labels = make_labels(batch, shape, a.seed) if "train" in a.targets else None
            for target in a.targets:
                self.time_cell(target, dtype, shape, batch, x, labels)
        if not a.no_memory:
            self.memory()
        self.progress.close()
        return self.result

    def count_macs(self) -> None:
        """MACs (one image) of every config at every shape."""
        for shape in self.args.shapes:
            x = torch.zeros(1, 3, *shape)
            for name, model in self.models.items():
                self.progress.set_description_str(f"MACs {name} {shape[0]}x{shape[1]}")
                macs = segmentor_macs(model, x, "segmentor" in self.args.targets)
                row = dict(config=name, shape=list(shape), tokens=patch_tokens(model, shape),
                           **{t: r.macs for t, r in macs.items()},
                           scoring=macs["backbone"].scoring_macs,
                           dc_term=macs["backbone"].dc_term_macs)  # fmt: skip
                self.result["macs"].append(row)
                if name == self.ref:
                    self.budget.macs.update({(t, tuple(shape)): row[t] for t in TARGETS
                                             if t in row})  # fmt: skip
                self.progress.update()

    def _macs(self, name, shape, target):
        rows = [r for r in self.result["macs"] if r["config"] == name and r["shape"] == [*shape]]
        return rows[0].get(target) if rows else None

    def skip(self, kind, target, dtype, shape, batch, reason) -> None:
        self.result["skipped"].append(dict(kind=kind, target=target, dtype=dtype, batch=batch,
                                           shape=list(shape), reason=reason))  # fmt: skip

    def time_cell(self, target, dtype, shape, batch, x, labels=None) -> None:
        """Alternating timing of every config on one (target, dtype, shape, batch) cell."""
        a, budget = self.args, self.budget
        rounds = a.warmup + a.iters
        self.progress.set_description_str(f"{target} {dtype} {shape[0]}x{shape[1]} b{batch}")
        reason = budget.reason(budget.estimate(dtype, target, shape, batch, rounds))
        if reason:
            self.skip("timing", target, dtype, shape, batch, reason)
            self.progress.update(rounds)
            return
        fns = {n: forward_fn(m, target, x, dtype, labels) for n, m in self.models.items()}
        compile_s = {}
        if a.compile and target != "train":
            # Compiled twins, timed in the same alternation; compilation itself is untimed.
            for n, m in self.models.items():
                fns[n + COMPILED], compile_s[n + COMPILED] = compiled_forward_fn(m, target, x,
                                                                                 dtype)  # fmt: skip
        step = lambda _: self.progress.update()  # noqa: E731
        clock = time.thread_time if a.cpu_time else time.perf_counter
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
        cell = timed_cell(fns, self.ref, a.iters, 0, x.device, step, clock)
        budget.per_image[(dtype, target, shape)] = sum(
            c["stats"].median_s for c in cell.values()) / batch  # fmt: skip
        ref_macs = self._macs(self.ref, shape, target)
        for name, c in cell.items():
            s, macs = c["stats"], self._macs(name.removesuffix(COMPILED), shape, target)
            # Against the reference run the same way (compiled vs compiled, eager vs eager).
            same_mode = self.ref + COMPILED if name.endswith(COMPILED) else self.ref
            ratio = macs / ref_macs if (macs and ref_macs) else None
            row = self._row(name, target, dtype, shape, batch, **s.to_dict(batch))
            row.update(warmup_s=list(warm.get(name, [])), speedup=c["speedup"],
                       speedup_paired=c["speedup_paired"], macs_ratio=ratio,
                       speedup_per_ideal=c["speedup"] * ratio if ratio else None,
                       compiled=name.endswith(COMPILED), compile_s=compile_s.get(name),
                       speedup_same_mode=cell[same_mode]["stats"].median_s / s.median_s,
                       )  # fmt: skip
            self.result["timing"].append(row)

    def memory(self) -> None:
        """Peak memory of one pass per (config, target, shape, batch): on CUDA in this process,
        on CPU in a fresh child process per cell (memory the parent holds would hide it)."""
        a, device = self.args, self.device
        timeout = max(600.0, 4 * (a.max_cell_seconds or 600.0))
        cells = itertools.product(a.dtypes, a.memory_shapes, a.memory_batch_sizes)
        for dtype, shape, batch in cells:
            x = labels = None
            for target in a.memory_targets:
                for name, path, ratio in self.entries:
                    self.progress.set_description_str(
                        f"memory {name} {target} {shape[0]}x{shape[1]} b{batch}"
                    )
                    row = self._row(name, target, dtype, shape, batch, error=None)
                    if device.type != "cuda":
                        spec = dict(config=osp.abspath(path), target=target, shape=list(shape),
                                    batch=batch, tiny=a.quick, threads=a.threads, seed=a.seed,
                                    keep_ratio=ratio)  # fmt: skip
                        row.update(run_memory_probe(spec, timeout))
                    else:
                        if x is None:
                            x = make_images(batch, shape, self.norms[self.ref], a.seed).to(device)
                            if "train" in a.memory_targets:
                                labels = make_labels(batch, shape, a.seed)
                        row.update(self._cuda_memory(name, target, x, dtype, labels))
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
