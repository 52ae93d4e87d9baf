"""Reports of the token-reducer study (:func:`fatr_seg.analysis.study.run_study`).

:func:`write_report` writes ``table.md`` (mIoU, MACs, images/s; per-layer diagnostics; HF-set
IoU) and :func:`plot` the figures ``rank_collapse.png``, ``miou.png`` and ``hf_iou.png``, both
from the content of ``results.json``. Means and standard deviations are over seeds.
"""

from __future__ import annotations

import math
import os.path as osp
import statistics

import numpy as np

__all__ = ["collect", "layer_mean", "mean_std", "plot", "pm", "write_report"]


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


def collect(data: dict, method: str, phase: str, field: str) -> list:
    """The values of ``s{seed}/{method}/{phase}/{field}`` of every seed that has one."""
    runs, seeds = data["runs"], data["settings"]["seeds"]
    return [runs[k] for s in range(seeds) if (k := f"s{s}/{method}/{phase}/{field}") in runs]


def layer_mean(data, method, phase, key) -> list[float]:
    """Per-layer diagnostic ``key`` of ``method`` after ``phase``, averaged over seeds."""
    diags = collect(data, method, phase, "diag")
    if not diags:
        return []
    return np.mean([d[key] for d in diags], axis=0).tolist()


def write_report(data: dict, work_dir: str) -> str:
    """Write ``table.md`` under ``work_dir``; returns its text."""
    st, runs = data["settings"], data["runs"]
    names = ["none", *st["methods"]]
    macs, ips = runs.get("macs", {}), runs.get("images_per_s", {})
    base_macs = macs.get("none")
    lines = [
        "# Token-reducer study (synthetic ADE20K-layout data)",
        "",
        f"Model: ViT (C={st['embed_dims']}, depth {st['depth']}, {st['num_heads']} heads, patch "
        f"{st['patch_size']}) + Segmenter mask head ({st['head_layers']} layer), "
        f"{st['img_size']}² inputs; {st['num_train']} train / {st['num_val']} val images; "
        f"baseline {st['base_iters']} iters (lr {st['base_lr']}), fine-tuning {st['ft_iters']} "
        f"iters (lr {st['ft_lr']}), batch {st['batch_size']}; seeds: {st['seeds']}"
        f"{' (one shared baseline)' if st['shared_baseline'] else ''}. Reduction at blocks "
        f"{tuple(st['layers'])}, keep_ratio {st['keep_ratio']}; "
        f"kept patch tokens per layer: {runs.get('budget', {}).get('kept_per_layer')} of "
        f"{runs.get('budget', {}).get('grid')}.",
        "",
        "| method | mIoU training-free | mIoU fine-tuned | GMACs | MACs vs none | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        free, ft = collect(data, n, "free", "miou"), collect(data, n, "ft", "miou")
        mac = macs.get(n)
        rel = f"{100 * (mac / base_macs - 1):+.1f} %" if mac and base_macs else "n/a"
        lines.append(
            f"| {n} | {pm(free, 2)} | {pm(ft, 2)} | "
            f"{mac / 1e9:.4f} | {rel} | {f'{ips[n]:.1f}' if n in ips else 'n/a'} |"
            if mac
            else f"| {n} | {pm(free, 2)} | {pm(ft, 2)} | n/a | n/a | n/a |"
        )
    lines += ["", "mIoU in %, mean ± std over seeds. `none` = no reduction ('free' = the "
              "baseline itself, 'fine-tuned' = the baseline trained for the same extra iters).",
              "", "## Per-layer diagnostics (fine-tuned models, mean over seeds)", ""]  # fmt: skip
    depth = st["depth"]
    header = "| quantity | method | " + " | ".join(str(i + 1) for i in range(depth)) + " |"
    lines += [header, "|---|---|" + "---|" * depth]
    for key, label in (("hf_restored", "‖H_f‖/‖X‖ restored grid"),
                       ("hf_tokens", "‖H_f‖/‖X‖ token set"),
                       ("cos_to_last", "cos to last layer"),
                       ("num_tokens", "tokens (no CLS)")):  # fmt: skip
        for n in names:
            vals = layer_mean(data, n, "ft", key)
            if vals:
                digits = 0 if key == "num_tokens" else 3
                lines.append(f"| {label} | {n} | " + " | ".join(f"{v:.{digits}f}" for v in vals)
                             + " |")  # fmt: skip
    iou_keys = [("fatr_evit/free", "FATR vs EViT, baseline weights (training-free)"),
                ("fatr_evit/ft", "FATR vs EViT, each fine-tuned"),
                ("fatr_random/free", "FATR vs random, baseline weights")]  # fmt: skip
    lines += ["", "## HF-set IoU per reduction layer", "",
              "| pair | " + " | ".join(f"layer {i}" for i in st["layers"]) + " |",
              "|---|" + "---|" * len(st["layers"])]  # fmt: skip
    for key, label in iou_keys:
        vals = [runs[k] for s in range(st["seeds"]) if (k := f"s{s}/iou/{key}") in runs]
        if vals:
            cells = [pm([v[i] for v in vals], 3) for i in range(len(st["layers"]))]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    chance = runs.get("budget", {}).get("chance_iou_fixed_grid")
    if chance:
        lines.append("| chance (two random kept sets of the same sizes) | "
                     + " | ".join(f"{c:.3f}" for c in chance) + " |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    with open(osp.join(work_dir, "table.md"), "w") as f:
        f.write(text)
    return text


def plot(data: dict, work_dir: str) -> list[str]:
    """Write the study's figures under ``work_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = data["settings"]
    names = ["none", *st["methods"]]
    layers = np.arange(1, st["depth"] + 1)
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("hf_restored", "hf_tokens", "cos_to_last"),
                              ("‖H_f[X]‖/‖X‖, restored grid", "‖H_f[X]‖/‖X‖, token set",
                               "cosine similarity to last layer"), strict=True):  # fmt: skip
        for n in names:
            vals = layer_mean(data, n, "ft", key)
            if vals:
                ax.plot(layers, vals, marker="o", label=n)
        for r in st["layers"]:
            ax.axvline(r, color="grey", lw=0.5, ls="--")
        ax.set_xlabel("block")
        ax.set_title(title)
    axes[0].legend()
    paths.append(_save(fig, osp.join(work_dir, "rank_collapse.png")))

    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.38
    for j, phase in enumerate(("free", "ft")):
        means, stds = zip(*(mean_std(collect(data, n, phase, "miou")) for n in names), strict=True)
        ax.bar(np.arange(len(names)) + (j - 0.5) * w, means, w, yerr=stds, capsize=3,
               label="training-free" if phase == "free" else "fine-tuned")  # fmt: skip
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("mIoU (%)")
    ax.legend()
    paths.append(_save(fig, osp.join(work_dir, "miou.png")))

    runs = data["runs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("fatr_evit/free", "FATR vs EViT (training-free)"),
                       ("fatr_evit/ft", "FATR vs EViT (fine-tuned)"),
                       ("fatr_random/free", "FATR vs random")):  # fmt: skip
        vals = [runs[k] for s in range(st["seeds"]) if (k := f"s{s}/iou/{key}") in runs]
        if vals:
            ax.plot(st["layers"], np.mean(vals, axis=0), marker="o", label=label)
    chance = runs.get("budget", {}).get("chance_iou_fixed_grid")
    if chance:
        ax.plot(st["layers"], chance, ls="--", color="grey", label="chance")
    ax.set_xlabel("reduction block")
    ax.set_ylabel("IoU of kept sets")
    ax.legend()
    paths.append(_save(fig, osp.join(work_dir, "hf_iou.png")))
    return paths


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
