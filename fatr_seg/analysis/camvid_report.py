"""Table (``table.md``) and plots (``miou.png``, ``per_class.png``, ``hf_amplitude.png``) of
the CamVid study's ``results.json``. matplotlib is imported only to plot.
"""

from __future__ import annotations

import math
import os.path as osp
import statistics

import numpy as np

from ..datasets.camvid import CAMVID_CLASSES
from ..layers.config import ReductionConfig
from .tables import fmt, markdown_section, markdown_table

__all__ = ["mean_std", "paired_delta", "plot", "pm", "write_report"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: list[float], digits: int = 1) -> str:
    """``mean ± std`` of ``values``, the value alone when there is one, or ``n/a``."""
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def _pm_n(values: list[float]) -> str:
    """:func:`pm` with the number of values, for the columns whose seeds may differ."""
    return pm(values, 2) + (f" (n={len(values)})" if values else "")


def _ft(runs: dict, seeds, method: str, phase: str = "ft") -> list[dict]:
    """A method's results of ``phase``: ``free`` (one, or none), else one per seed."""
    if phase == "free":
        return [runs[k] for k in [f"free/{method}"] if k in runs]
    return [runs[k] for s in seeds if (k := f"{phase}/{method}/s{s}") in runs]


def paired_delta(runs: dict, seeds, method: str, phase: str = "ft") -> tuple[float, float, int]:
    """Mean over seeds of ``phase/method/s`` minus ``ft/none/s`` (the unreduced model's
    fine-tuning with the same seed and data order), its standard error (NaN for one seed) and
    the number of pairs (0: mean NaN)."""
    diffs = [runs[k]["mIoU"] - runs[f"ft/none/s{s}"]["mIoU"] for s in seeds
             if (k := f"{phase}/{method}/s{s}") in runs and f"ft/none/s{s}" in runs]  # fmt: skip
    if not diffs:
        return math.nan, math.nan, 0
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return statistics.fmean(diffs), se, len(diffs)


def _delta_text(runs: dict, seeds, method: str, phase: str = "ft") -> str:
    mean, se, n = paired_delta(runs, seeds, method, phase)
    if n == 0:
        return "n/a"
    return f"{mean:+.2f}" if n == 1 else f"{mean:+.2f} ± {se:.2f}"


def _class_mean(results: list[dict]) -> list[float]:
    """Per-class IoU averaged over results (NaN where a class has no value)."""
    if not results:
        return [math.nan] * len(CAMVID_CLASSES)
    rows = [[math.nan if v is None else v for v in r["IoU"]] for r in results]
    with np.errstate(all="ignore"):
        return np.nanmean(np.asarray(rows, dtype=float), axis=0).tolist()


def _speed(cost: dict | None, name: str, batch: str) -> float | None:
    cell = (cost or {}).get("images_per_s", {}).get(batch, {}).get(name)
    return None if cell is None else cell["median"]


def _budget_text(b: dict) -> str:
    """The budget of a method's reduction as its config resolves it (preset values included)."""
    if b["reduction"] is None:
        return "—"
    red = ReductionConfig.from_dict(b["reduction"])
    key, values = ("r", red.r) if red.keep_ratio is None else ("keep_ratio", red.keep_ratio)
    return f"{key} {values[0] if len(set(values)) == 1 else values} at {red.layers}"


def _protocol(st: dict, images: str) -> str:
    """One paragraph: baseline, fine-tuning, evaluation and budgets of the run."""
    if st["baseline_checkpoint"]:
        base = f"Baseline: {st['baseline_checkpoint']}."
    else:
        base = (f"Baseline: trained here ({st['base_iters']} iterations, batch "
                f"{st['batch_size']}, {st['crop_size']}² crops, AdamW lr {st['base_lr']}, head "
                f"x{st['head_lr_mult']:g}, {st['warmup_iters']} warm-up iterations then poly "
                "decay).")  # fmt: skip
    ema = f"EMA momentum {st['ema_momentum']:g}" if st["ema"] else "no EMA"
    budgets = (f"equal backbone MACs at 368x480 (±{100 * st['mac_tol']:g} %)"
               if st["equal_macs"] else "each method's preset")  # fmt: skip
    return (f"{base} Fine-tuning: {st['ft_iters']} iterations of CE + self-distillation (T "
            f"{st['temperature']:g}, lr {st['ft_lr']:g}, {ema}), seeds {st['seeds']}. "
            f"Evaluation: CamVid val ({images} images), whole 360x480 images padded to 368x480 "
            f"(23x30 tokens). Budgets: {budgets}.")  # fmt: skip


def write_report(data: dict, work_dir: str) -> str:
    """Write ``table.md`` under ``work_dir``; returns its text."""
    st, runs = data["settings"], data["runs"]
    methods, seeds = st["methods"], st["seeds"]
    cost = runs.get("cost") or {}
    batches = list(cost.get("images_per_s", {}))
    deploy = "unreduced" in st.get("finetune_as", ("own",))
    header = ["method", "budget", "mIoU training-free", "mIoU fine-tuned", "Δ paired"]
    header += ["mIoU on none's fine-tuning", "Δ paired"] if deploy else []
    header += ["backbone GMACs", "segmentor GMACs"]
    header += [f"{what} {b}" for b in batches for what in ("images/s", "speed-up")]
    rows = []
    for m in methods:
        free = runs.get(f"free/{m}")
        macs = cost.get("macs", {}).get(m, {})
        cells = [m, _budget_text(runs[f"budget/{m}"]), fmt(free and free["mIoU"], ".2f", "n/a"),
                 _pm_n([r["mIoU"] for r in _ft(runs, seeds, m)]),
                 "—" if m == "none" else _delta_text(runs, seeds, m)]  # fmt: skip
        if deploy:
            cells += ["—", "—"] if m == "none" else [
                _pm_n([r["mIoU"] for r in _ft(runs, seeds, m, "deploy")]),
                _delta_text(runs, seeds, m, "deploy")]  # fmt: skip
        cells += [fmt(macs.get("backbone", math.nan) / 1e9, ".3f", "n/a"),
                  fmt(macs.get("segmentor", math.nan) / 1e9, ".3f", "n/a")]  # fmt: skip
        for b in batches:
            ips, ref = _speed(cost, m, b), _speed(cost, "none", b)
            cells += [fmt(ips, ".2f", "n/a"), f"{ips / ref:.2f}x" if ips and ref else "n/a"]
        rows.append(cells)
    align = ["left"] * 2 + ["right"] * (len(header) - 2)
    lines = [
        "# CamVid study: token reducers on a real pretrained Segmenter-Mask ViT-Ti/16", "",
        _protocol(st, _images(runs)), "", markdown_table(header, rows, align),
        "mIoU in %; fine-tuned: mean ± std over seeds. `none` fine-tuned is the baseline given "
        "the same fine-tuning; Δ paired: the mean over seeds of the method minus `none` with the "
        "same seed and data order, ± its standard error. On none's fine-tuning: the method "
        "applied, without training of its own, to the weights of `none` fine-tuned. images/s: "
        "whole-image inference (`encode_decode`) at 360x480, median over the timed rounds, "
        f"{st['bench_threads']} thread(s), all methods alternating in one process; batch b1 / "
        "b8 = 1 / 8 images.", "",
    ]  # fmt: skip
    lines += _budget_table(runs, methods) + _class_table(runs, methods, seeds)
    lines += _hf_table(runs, methods) + _train_table(runs)
    text = "\n".join(lines) + "\n"
    with open(osp.join(work_dir, "table.md"), "w") as f:
        f.write(text)
    return text


def _images(runs: dict) -> str:
    counts = {r["images"] for k, r in runs.items() if k.startswith("free/")}
    return "/".join(map(str, sorted(counts))) or "n/a"


def _budget_table(runs: dict, methods) -> list[str]:
    cost = runs.get("cost") or {}
    rows = []
    for m in methods:
        b = runs[f"budget/{m}"]
        counted = cost.get("macs", {}).get(m, {}).get("backbone")
        red = "None" if b["reduction"] is None else ", ".join(
            f"{k}={v}" for k, v in b["reduction"].items())  # fmt: skip
        red = f"`{red}`"
        if "train_reduction" in b:  # a token count, scaled to the training crop
            red += f" (fine-tuned with `r={b['train_reduction']['r']}`)"
        rows.append([m, red, f"{b['macs'] / 1e9:.4f}", fmt(counted and counted / 1e9, ".4f", "n/a"),
                     f"{100 * (b['macs'] / b['target'] - 1):+.2f} %"])  # fmt: skip
    header = ["method", "reduction", "backbone GMACs (closed form)", "counted", "vs FATR"]
    return markdown_section("Budgets", header, rows, left=2) + [
        "Closed form: `analytic_vit_macs`; counted: `count_macs` on the model's backbone (one "
        "368x480 image).", ""]  # fmt: skip


def _class_table(runs: dict, methods, seeds) -> list[str]:
    rows = [[m, phase] + [fmt(v, ".1f", "n/a") for v in _class_mean(results)] for m in methods
            for phase, results in (("free", _ft(runs, seeds, m, "free")),
                                   ("fine-tuned", _ft(runs, seeds, m))) if results]  # fmt: skip
    return markdown_section("Per-class IoU (%)", ["method", "phase", *CAMVID_CLASSES], rows,
                            left=2)  # fmt: skip


def _hf_table(runs: dict, methods) -> list[str]:
    lines = []
    for phase, title in (("free", "training-free"), ("ft", "fine-tuned, first seed")):
        found = [(m, runs[k]) for m in methods if (k := f"hf/{phase}/{m}") in runs]
        if not found:
            continue
        blocks = [str(i + 1) for i in range(len(found[0][1]["hf_restored"]))]
        rows = [
            [m, label] + [f"{v:.3f}" for v in d[key]]
            for m, d in found
            for key, label in (("hf_restored", "restored grid"), ("hf_tokens", "token set"))
        ]
        title = f"Relative HF amplitude ‖X − mean(X)‖/‖X‖ per block ({title})"
        lines += markdown_section(title, ["method", "measured on", *blocks], rows, left=2)
    return lines


def _train_table(runs: dict) -> list[str]:
    rows = [[k[len("train/") :], v["iters"], fmt(v.get("s_per_iter"), ".2f", "n/a"),
             f"{v['seconds'] / 60:.1f}"] for k, v in sorted(runs.items())
            if k.startswith("train/")]  # fmt: skip
    header = ["run", "iterations", "s / iteration (median)", "wall time incl. start (min)"]
    return markdown_section("Training runs of this machine", header, rows) if rows else []


def plot(data: dict, work_dir: str) -> list[str]:
    """Write the study's figures under ``work_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, runs = data["settings"], data["runs"]
    methods, seeds = st["methods"], st["seeds"]
    cost = runs.get("cost") or {}
    paths = []

    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 3, 4))
    w = 0.38
    free = [runs.get(f"free/{m}", {}).get("mIoU", math.nan) for m in methods]
    ft = [mean_std([r["mIoU"] for r in _ft(runs, seeds, m)]) for m in methods]
    x = np.arange(len(methods))
    ax.bar(x - w / 2, free, w, label="training-free")
    ax.bar(x + w / 2, [m for m, _ in ft], w, yerr=[s for _, s in ft], capsize=3,
           label="fine-tuned")  # fmt: skip
    labels = [f"{m}\n{cost.get('macs', {}).get(m, {}).get('backbone', math.nan) / 1e9:.2f} G"
              for m in methods]  # fmt: skip
    ax.set_xticks(x, labels)
    ax.set_ylabel("mIoU (%), CamVid val")
    ax.set_title("mIoU per method (under each: its backbone GMACs at 368x480)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    paths.append(_save(fig, osp.join(work_dir, "miou.png")))

    fig, axes = plt.subplots(1, 2, figsize=(14, 0.5 * len(methods) + 2))
    for ax, (phase, title) in zip(axes, (("free", "training-free"), ("ft", "fine-tuned"))):
        rows = [_class_mean(_ft(runs, seeds, m, phase)) for m in methods]
        im = ax.imshow(np.asarray(rows), vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(CAMVID_CLASSES)), CAMVID_CLASSES, rotation=60, ha="right")
        ax.set_yticks(range(len(methods)), methods if phase == "free" else [])  # one set of names
        ax.set_title(f"per-class IoU (%), {title}")
        for (i, j), v in np.ndenumerate(np.asarray(rows)):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="k" if v > 60 else "w")  # fmt: skip
    fig.colorbar(im, ax=axes, shrink=0.8)
    paths.append(_save(fig, osp.join(work_dir, "per_class.png"), tight=False))

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey=True)
    for row, phase in enumerate(("free", "ft")):
        for col, (key, what) in enumerate((("hf_restored", "restored grid"),
                                           ("hf_tokens", "token set"))):  # fmt: skip
            ax = axes[row, col]
            for m in methods:
                d = runs.get(f"hf/{phase}/{m}")
                if d:
                    ax.plot(range(1, len(d[key]) + 1), d[key], marker="o", ms=3, label=m)
            ax.set_title(f"‖H_f[X]‖/‖X‖ on the {what}, "
                         f"{'training-free' if phase == 'free' else 'fine-tuned'}")  # fmt: skip
            ax.set_xlabel("block")
    axes[0, 0].legend(fontsize=8)
    paths.append(_save(fig, osp.join(work_dir, "hf_amplitude.png")))
    return paths


def _save(fig, path: str, tight: bool = True) -> str:
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
