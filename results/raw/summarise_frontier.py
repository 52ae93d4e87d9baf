# ruff: noqa: E501  (provenance strings: commands and protocol as they ran)
"""Summarise the CamVid frontier study (a camvid_study results.json run with --finetune-as
unreduced) into results/camvid_vit-t_frontier.json, and draw docs/img/camvid_frontier.png from it.

A one-off provenance script; run from the repository root:
    python results/raw/summarise_frontier.py RAW OUT COMMIT [PNG]
"""

import json
import statistics
import sys

from _common import (
    MACHINE,
    STACK,
    columns,
    frontier_run,
    paired,
    paired_delta,
    raw,
    speedups,
    text,
    write,
)

png = sys.argv[4] if len(sys.argv) > 4 else None
extra_paths = sys.argv[5:]  # runs on the same weights (ToMe constant, ...) and the timing run
data = raw()
runs, seeds = data["runs"], data["settings"]["seeds"]
DEFAULT = "configs/camvid/fatr_vit-t_camvid.py"
LATE = "configs/camvid/fatr-late_vit-t_camvid.py"
# key -> (family, label, config, budget)
LABEL = {
    "none": ("none", "none (the baseline)", "configs/camvid/segmenter_vit-t_camvid.py", "—"),
    "local@0.8": (
        "FATR",
        "FATR, keep 0.8 at block 2",
        None,
        "0.8 / 0.8 / 0.9 at 2 (2×2 windows) / 5 / 8",
    ),
    "local@0.7": (
        "FATR",
        "FATR, keep 0.7 at block 2",
        None,
        "0.7 / 0.7 / 0.8 at 2 (2×2 windows) / 5 / 8",
    ),
    "local@0.6": (
        "FATR",
        "FATR, keep 0.6 at block 2",
        None,
        "0.6 / 0.7 / 0.8 at 2 (2×2 windows) / 5 / 8",
    ),
    "local@0.55": (
        "FATR",
        "FATR, keep 0.55 at block 2, exact HF score",
        None,
        "0.55 / 0.6 / 0.8 at 2 (2×2 windows) / 5 / 8",
    ),
    "fatr_local": (
        "FATR",
        "FATR, keep 0.5 at block 2",
        None,
        "0.5 / 0.6 / 0.8 at 2 (2×2 windows) / 5 / 8",
    ),
    "local@0.5b": (
        "FATR",
        "FATR, keep 0.5 / 0.5 / 0.7",
        None,
        "0.5 / 0.5 / 0.7 at 2 (2×2 windows) / 5 / 8",
    ),
    "fatr_default": ("FATR late", "FATR late schedule (`fatr`)", LATE, "0.7 at 4, 7, 10"),
    "tome@0.8": ("ToMe", "ToMe, keep 0.8", None, "0.8 at 4, 7, 10"),
    "tome@0.7": ("ToMe", "ToMe, keep 0.7", None, "0.7 at 4, 7, 10"),
    "tome@0.6": ("ToMe", "ToMe, keep 0.6", None, "0.6 at 4, 7, 10"),
    "tome@0.5": ("ToMe", "ToMe, keep 0.5", None, "0.5 at 4, 7, 10"),
    "algm@0.8": ("ALGM", "ALGM, keep 0.8", None, "0.8 at 1 (2×2 windows) and 5"),
    "algm@0.7": ("ALGM", "ALGM, keep 0.7", None, "0.7 at 1 (2×2 windows) and 5"),
    "algm": ("ALGM", "ALGM, keep 0.58", None, "0.58 at 1 (2×2 windows) and 5"),
    "algm@0.5": ("ALGM", "ALGM, keep 0.5", None, "0.5 at 1 (2×2 windows) and 5"),
}
EXTRA_LABEL = {
    f"tomec@{r}": ("ToMe constant", f"ToMe, constant r = {r}", None, f"r = {r} at 1 … 12")
    for r in (30, 36, 42, 52)
}
# The default: the keep-0.55 schedule with its HF score from 256 strided query rows.
EXTRA_LABEL["q256"] = ("FATR default", "FATR default (`fatr_local`)", DEFAULT,
                       "0.55 / 0.6 / 0.8 at 2 (2×2 windows) / 5 / 8")  # fmt: skip
EXTRA_LABEL.update({
    f"late@{k}": ("FATR late", f"FATR late schedule, keep {k}", None, f"{k} at 4, 7, 10")
    for k in ("0.8", "0.6", "0.5")
})  # fmt: skip
sources = [(runs, LABEL)]
timing = None  # tools/benchmark.py's benchmark.json: every row's speed from one alternating run
for path in extra_paths:
    extra = json.load(open(path))
    if extra.get("schema", "").startswith("fatr_seg.benchmark/"):
        timing = extra
        continue
    extra = extra["runs"]
    sources.append((extra, {k: v for k, v in EXTRA_LABEL.items() if f"budget/{k}" in extra}))


def speed(cost: dict, key: str) -> dict[str, float]:
    if timing is None:
        return speedups(cost, key)
    # the timing run's configs are named after the keys (none: the plain Segmenter config)
    name = "segmenter_vit-t_camvid" if key == "none" else key.replace("@", "-at-").replace(".", "p")
    cells = [t for t in timing["timing"] if t["config"] == name and t["target"] == "segmentor"]
    return {f"speedup_b{t['batch']}": t["speedup"] for t in cells}


rows = []
for runs, labels in sources:
    cost = runs["cost"]
    for key, (family, name, config, budget) in labels.items():
        res = runs[f"budget/{key}"]["resolved"]
        values = [
            runs[f"ft/none/s{s}" if key == "none" else f"deploy/{key}/s{s}"]["mIoU"] for s in seeds
        ]
        row = dict(
            family=family,
            method=name,
            key=key,
            budget=budget,
            backbone_gmacs=cost["macs"][key]["backbone"] / 1e9,
            **speed(cost, key),
            miou_free=runs[f"free/{key}"]["mIoU"],
            miou_ft=statistics.fmean(values),
            miou_ft_std=statistics.stdev(values) if len(values) > 1 else None,
            miou_ft_per_seed=values,
            seeds=len(values),
            reduction=json.dumps(res) if res else None,
        )
        if key != "none":
            diffs = [v - runs[f"ft/none/s{s}"]["mIoU"] for v, s in zip(values, seeds)]
            row["delta"], row["delta_se"] = paired(diffs)
        own = [runs.get(f"ft/{key}/s{s}", {}).get("mIoU") for s in seeds]
        if key != "none" and None not in own:  # also fine-tuned with its reduction in the loop
            row["miou_own_ft"] = statistics.fmean(own)
            diffs = [v - runs[f"ft/none/s{s}"]["mIoU"] for v, s in zip(own, seeds)]
            row["delta_own"], row["delta_own_se"] = paired(diffs)
        if config:
            row["config"] = config
        if key in (
            "none",
            "local@0.55",
            "fatr_local",
            "local@0.6",
            "fatr_default",
            "tome@0.6",
            "tome@0.5",
            "algm@0.7",
            "algm",
            "tomec@52",
            "q256",
        ):
            row["readme"] = "yes"
        if key == "q256":
            row["bold"] = True
        rows.append(row)
# The default's row next to its exact-score form (its accuracy came from a run of its own).
default = next((r for r in rows if r["key"] == "q256"), None)
if default:
    rows.remove(default)
    rows.insert(next(i for i, r in enumerate(rows) if r["key"] == "local@0.55"), default)
write(
    title="CamVid val, Segmenter-Mask ViT-Ti/16: FATR, ToMe and ALGM at several budgets, each applied to the same fine-tuned unreduced model (3 paired seeds), against measured CPU speed",
    how=" (tools/camvid_study.py's results.json)",
    date="2026-12-07",
    machine=f"{MACHINE}; {STACK}; load average {timing['machine']['load_avg'][0]:.1f} at the timing (speed-ups: all models alternating in one process)",
    command=[
        "python tools/camvid_study.py --data-root ../shared/data/camvid --pretrained ../shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors --work-dir work_dirs/cs_base --methods none --seeds 0 --base-iters 500 --threads 2   # the baseline (stopped after its checkpoint)",
        "pos_embed of iter_500.pth resampled (bicubic, fatr_seg.layers.embed.resample_pos_embed) from the 256 crop's 16x16 grid to the 352 crop's 22x22: baseline_500_352.pth",
        'L=\'"score":["window_hf","hf_bipartite","hf_bipartite"],"prop_attn":true,"layers":[2,5,8]\'; python tools/camvid_study.py --data-root ../shared/data/camvid --baseline-checkpoint baseline_500_352.pth --work-dir work_dirs/cs_deploy --model-config configs/camvid/fatr-local_vit-t_camvid.py --methods none fatr_local algm --seeds 0 1 2 --ft-iters 100 --base-iters 500 --crop-size 352 --threads 2 --finetune-as unreduced --variants "local@0.8={$L,\\"keep_ratio\\":[0.8,0.8,0.9]}" "local@0.7={$L,\\"keep_ratio\\":[0.7,0.7,0.8]}" "local@0.6={$L,\\"keep_ratio\\":[0.6,0.7,0.8]}" "local@0.5b={$L,\\"keep_ratio\\":[0.5,0.5,0.7]}" \'fatr_default={"method":"fatr"}\' \'tome@0.8={"method":"tome","keep_ratio":0.8}\' \'tome@0.7={"method":"tome","keep_ratio":0.7}\' \'tome@0.6={"method":"tome","keep_ratio":0.6}\' \'tome@0.5={"method":"tome","keep_ratio":0.5}\' \'algm@0.8={"method":"algm","keep_ratio":0.8}\' \'algm@0.7={"method":"algm","keep_ratio":0.7}\' \'algm@0.5={"method":"algm","keep_ratio":0.5}\'   # configs/camvid/fatr-local_vit-t_camvid.py was then the fatr_local config (now configs/camvid/fatr_vit-t_camvid.py); ft_none_s0 copied from the local-stage study (same settings); fatr_local was then keep 0.5 / 0.6 / 0.8 (the row "FATR, keep 0.5 at block 2")',
        "python tools/camvid_study.py ... (the same options) --methods none fatr_local --finetune-as both   # fatr_local fine-tuned with its reduction in the loop, seeds 1 and 2 (seed 0: the local-stage study's run, same settings, copied)",
        'python tools/camvid_study.py ... (the first command\'s options) --variants ... "local@0.55={$L,\\"keep_ratio\\":[0.55,0.6,0.8]}" ...   # adds the keep 0.55 schedule (now the fatr_local preset) and times all 16 models again, alternating (superseded by the timing run below)',
        frontier_run("work_dirs/cs_tc")
        + ' --variants \'tomec@30={"method":"tome_constant","r":30}\' ... (r = 36, 42, 52)   # ToMe\'s constant schedule, its own run (the same ft_none checkpoints copied; speed from the timing run below)',
        frontier_run("work_dirs/cs_sq")
        + ' --variants \'q256={"method":"fatr_local","score_queries":256}\' ... (Q = 64, 128)   # at 373aff5: the default with its HF score from 256 query rows (now the fatr_local preset), its own run (the same ft_none checkpoints copied; speed from the timing run below)',
        'python tools/camvid_study.py ... (as the line above, --work-dir work_dirs/cs_late) --variants \'late@0.8={"method":"fatr","keep_ratio":0.8}\' ... (0.6, 0.5)   # the late schedule at three more budgets, its own run (speed from the timing run below)',
        "python tools/benchmark.py configs/camvid/segmenter_vit-t_camvid.py work_dirs/frontier_cfgs/*.py --targets segmentor --shapes 368x480 --batch-sizes 1 8 --iters 7 --threads 1 --cpu-time --no-memory --no-macs --time-budget 0 --max-cell-seconds 0 --out-dir work_dirs/bench_frontier3   # at the commit, an otherwise idle machine (the q256 config gives score_queries=256 itself): every row's speed, one run (the 23 configs: configs/camvid/fatr_vit-t_camvid.py with reduction=dict(_delete_=True, **the row's resolved reduction), each file named after the row's key with '@' as '-at-' and '.' as 'p', which speed() reads back); results/raw/camvid_vit-t_frontier_timing_benchmark.json",
    ],
    protocol="baseline: 500 iterations from the timm ViT-Ti at 256² crops (free mIoU 50.2); the unreduced model fine-tuned from it with the study's self-distillation recipe (100 iterations, batch 8, 352² crops, EMA momentum 0.1) once per seed; every reduction applied to those weights without training of its own (what reduce_in_training=False trains); Δ: mean over seeds of (method − unreduced, same seed) ± its standard error; evaluated on the 101 val images at 360x480 (368x480 padded, 690 tokens); speed: whole segmentor at 368x480 (690 tokens), 1 thread, batch 1 and 8, all 24 models alternating in one process (tools/benchmark.py, random weights: the token counts and so the speed do not depend on them), 7 rounds, median, each call timed by its thread's CPU time so that other processes on the machine do not count",
    columns=columns(
        "method budget backbone_gmacs speedup miou_free miou_ft delta delta_own",
        budget=text("keep ratio at blocks", "budget"),
        miou_ft={
            "label": "mIoU fine-tuned",
            "format": ["{miou_ft:.2f} ± {miou_ft_std:.2f}", "{miou_ft:.2f}"],
        },
        delta={
            "label": "Δ vs none (paired)",
            "format": ["{delta:+.2f} ± {delta_se:.2f}", "{delta:+.2f}"],
            "empty": "—",
        },
        delta_own=paired_delta("Δ if fine-tuned reduced (paired)", "delta_own"),
    ),
    rows=rows,
    commit_note="the commit of the timing run; the accuracy runs ran at the commits their commands name or before (the reductions' outputs are unchanged since: the tests hold them equal)",
)
for r in rows:
    print(
        f"{r['key']:14s} {r['speedup_b1']:.2f} {r['speedup_b8']:.2f} {r['miou_free']:.2f} {r['miou_ft']:.2f} {r.get('delta', 0):+.2f} ± {r.get('delta_se') or 0:.2f}"
    )

if png:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    style = {
        "FATR": ("tab:red", "o"),
        "FATR default": ("tab:red", "*"),
        "FATR late": ("tab:orange", "s"),
        "ToMe": ("tab:blue", "^"),
        "ALGM": ("tab:green", "D"),
        "ToMe constant": ("tab:purple", "v"),
    }
    for ax, b in zip(axes, ("b1", "b8")):
        ax.axhline(0, color="0.5", lw=1, ls="--")
        ax.axhspan(-0.5, 0.5, color="0.9", zorder=0)
        for fam, (color, marker) in style.items():
            pts = sorted(
                (r[f"speedup_{b}"], r["delta"], r["delta_se"] or 0)
                for r in rows
                if r["family"] == fam
            )
            xs, ys, es = zip(*pts)
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                color=color,
                marker=marker,
                capsize=3,
                label=fam if fam != "FATR" else "FATR (early local stage, exact score)",
                markersize=14 if marker == "*" else 6,
                markeredgecolor="black" if marker == "*" else color,
                zorder=5 if marker == "*" else 2,
            )
        d = next(r for r in rows if r["key"] == "q256")
        ax.annotate(
            "default",
            (d[f"speedup_{b}"], d["delta"]),
            textcoords="offset points",
            xytext=(6, 8),
            color="tab:red",
        )
        ax.set_xlabel(f"measured speed-up, whole segmentor, CPU 1 thread, batch {b[1:]}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mIoU − unreduced (paired, {len(seeds)} seeds; band ±0.5)")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(
        "CamVid val, Segmenter-Mask ViT-Ti/16: every reduction on the same fine-tuned weights"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
