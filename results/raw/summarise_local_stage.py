# ruff: noqa: E501  (provenance strings: commands and protocol as they ran)
"""Summarise the CamVid local-stage study (a camvid_study results.json) into a results/ table file.

A one-off provenance script for results/camvid_vit-t_local-stage.json; run from the repository root.
"""

import json

from _common import COLUMNS, MACHINE, STACK, columns, raw, speedups, text, write

runs = raw()["runs"]
LABEL = {
    "none": ("none (the baseline)", "configs/camvid/segmenter_vit-t_camvid.py", "—"),
    "fatr_late@0.7": (
        "FATR default (`fatr`)",
        "configs/camvid/fatr_vit-t_camvid.py",
        "keep 0.7 at 4, 7, 10",
    ),
    "fatr_late@0.6": (
        "FATR default, keep 0.6",
        "configs/camvid/fatr_vit-t_camvid.py",
        "keep 0.6 at 4, 7, 10",
    ),
    "local@0.7": (
        "FATR local stage, keep 0.7 at block 2",
        "configs/camvid/fatr-local_vit-t_camvid.py",
        "keep 0.7 (2×2 windows) at 2, 0.7 at 5, 0.8 at 8",
    ),
    "local@0.6": (
        "FATR local stage, keep 0.6 at block 2",
        "configs/camvid/fatr-local_vit-t_camvid.py",
        "keep 0.6 (2×2 windows) at 2, 0.7 at 5, 0.8 at 8",
    ),
    "fatr": (
        "**FATR local stage (`fatr_local`), keep 0.5 at block 2**",
        "configs/camvid/fatr-local_vit-t_camvid.py",
        "keep 0.5 (2×2 windows) at 2, 0.6 at 5, 0.8 at 8",
    ),
    "algm": ("ALGM (equal MACs)", None, "keep 0.58 at 1 (2×2 windows) and 5"),
}
cost = runs["cost"]
ft_none = runs["ft/none/s0"]["mIoU"]
rows = []
for key in ("none", "fatr_late@0.7", "fatr_late@0.6", "local@0.7", "local@0.6", "fatr", "algm"):
    name, config, budget = LABEL[key]
    res = runs[f"budget/{key}"]["resolved"]
    row = dict(
        method=name,
        key=key,
        budget=budget,
        backbone_gmacs=cost["macs"][key]["backbone"] / 1e9,
        segmentor_gmacs=cost["macs"][key]["segmentor"] / 1e9,
        **speedups(cost, key),
        miou_free=runs[f"free/{key}"]["mIoU"],
        miou_ft=runs[f"ft/{key}/s0"]["mIoU"],
        seeds=1,
        reduction=json.dumps(res) if res else None,
    )
    if key != "none":
        row["delta"] = row["miou_ft"] - ft_none
    if config:
        row["config"] = config
    if key != "local@0.7":  # README shows the others
        row["readme"] = "yes"
    rows.append(row)
write(
    title="CamVid val, Segmenter-Mask ViT-Ti/16: the early local stage against the default's late schedule and ALGM, training-free and fine-tuned (seed 0, paired), CPU speed",
    how=" (tools/camvid_study.py's results.json)",
    date="2026-12-07",
    commit_note="the study ran on the working tree of this commit plus the early local stage; the row 'FATR local stage (fatr_local)' ran as the study's 'fatr' while fatr_local was the default under test (its resolved reduction is in the raw file)",
    machine=f"{MACHINE}; {STACK}; other test processes ran beside the timing (speed-ups: all models alternating in one process)",
    command=[
        "python tools/camvid_study.py --data-root ../shared/data/camvid --pretrained ../shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors --work-dir work_dirs/cs_base --methods none --seeds 0 --base-iters 500 --threads 2   # the baseline (stopped after its checkpoint)",
        "pos_embed of iter_500.pth resampled (bicubic, fatr_seg.layers.embed.resample_pos_embed) from the 256 crop's 16x16 grid to the 352 crop's 22x22: baseline_500_352.pth",
        "python tools/camvid_study.py --data-root ../shared/data/camvid --baseline-checkpoint baseline_500_352.pth --work-dir work_dirs/cs_352b --methods none fatr algm --seeds 0 1 2 --ft-iters 100 --base-iters 500 --crop-size 352 --threads 2   # stopped after seed 0; 'fatr' was then the local stage (now fatr_local)",
        'python tools/camvid_study.py --data-root ../shared/data/camvid --baseline-checkpoint baseline_500_352.pth --work-dir work_dirs/cs_352b --methods none fatr algm --seeds 0 --ft-iters 100 --base-iters 500 --crop-size 352 --threads 2 --variants \'fatr_late@0.7={"method":"fatr_late"}\' \'fatr_late@0.6={"method":"fatr_late","keep_ratio":0.6}\' \'local@0.7={"layers":[2,5,8],"keep_ratio":[0.7,0.7,0.8],"score":["window_hf","hf_bipartite","hf_bipartite"],"prop_attn":true}\' \'local@0.6={"layers":[2,5,8],"keep_ratio":[0.6,0.7,0.8],"score":["window_hf","hf_bipartite","hf_bipartite"],"prop_attn":true}\'   # fatr_late was then the name of today\'s default preset fatr (the same reduction: see the resolved reductions in the raw file)',
    ],
    protocol="baseline: 500 iterations from the timm ViT-Ti at 256² crops (under-trained: its free mIoU is 50.2); every model fine-tuned from it with the study's self-distillation recipe, 100 iterations, batch 8, 352² crops, seed 0 for all (paired: same data order), EMA momentum 0.1; evaluated on the 101 val images at 360x480 (368x480 padded, 690 tokens); speed: whole segmentor, 1 thread, batch 1 and 8, all models alternating, 5 rounds, median",
    columns=columns(
        "method budget backbone_gmacs speedup miou_free miou_ft delta",
        budget=text("budget (blocks)", "budget"),
        miou_ft=dict(COLUMNS["miou_ft"], label="mIoU fine-tuned (seed 0)"),
        delta={"label": "Δ fine-tuned vs none", "format": "{delta:+.2f}", "empty": "—"},
    ),
    rows=rows,
)
for r in rows:
    print(
        r["key"],
        round(r["speedup_b1"], 2),
        round(r["speedup_b8"], 2),
        round(r["miou_free"], 2),
        round(r["miou_ft"], 2),
        round(r.get("delta", 0), 2),
    )
