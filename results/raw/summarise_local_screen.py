# ruff: noqa: E501  (provenance strings: commands and protocol as they ran)
"""Summarise the training-free screen of the early local stage (a camvid_study results.json).

A one-off provenance script for results/camvid_vit-t_local-stage_screen.json; run from the
repository root.
"""

import json

from _common import MACHINE, STACK, columns, raw, speedups, text, write

runs = raw()["runs"]
WHAT = {
    "none": ("none (the baseline)", "—", "—", "—"),
    "hf@2": ("HF priority", "2", "yes", "the choice"),
    "sim@2": ("similarity (ALGM's rule)", "2", "yes", "window ranking"),
    "random@2": ("random windows", "2", "yes", "window ranking"),
    "hf@1": ("HF priority", "1", "yes", "block"),
    "hf@3": ("HF priority", "3", "yes", "block"),
    "hf@2-noprop": ("HF priority", "2", "no", "proportional attention"),
}
cost = runs["cost"]
rows = []
for key, (rank, block, prop, axis) in WHAT.items():
    rows.append(dict(
        key=key, ranking=rank, block=block, prop_attn=prop, varies=axis,
        miou_free=runs[f"free/{key}"]["mIoU"], backbone_gmacs=cost["macs"][key]["backbone"] / 1e9,
        **speedups(cost, key, ("b1",)),
        reduction=json.dumps(runs[f"budget/{key}"]["resolved"]),
    ))  # fmt: skip
write(
    title="CamVid val, Segmenter-Mask ViT-Ti/16, training-free: which windows the early local stage folds, at which block, with and without proportional attention",
    how=" (tools/camvid_study.py --no-finetune)",
    date="2026-12-07",
    machine=f"{MACHINE}; {STACK}; loaded (other processes beside it)",
    command=[
        'python tools/camvid_study.py --data-root ../shared/data/camvid --baseline-checkpoint work_dirs/baseline_500.pth --work-dir work_dirs/cs_screen --methods none --no-finetune --seeds 0 --base-iters 500 --ft-iters 100 --threads 2 --variants \'hf@2={"layers":[2,6],"keep_ratio":[0.5,0.7],"score":["window_hf","hf_bipartite"],"prop_attn":true}\' \'sim@2={... "window" ...}\' \'random@2={... "window_random" ...}\' \'hf@1={"layers":[1,6],...}\' \'hf@3={"layers":[3,6],...}\' \'hf@2-noprop={... "prop_attn":false}\'   # each variant\'s resolved reduction is in the raw file',
    ],
    protocol="the 500-iteration baseline (256² crops) of results/camvid_vit-t_local-stage.json; every variant: a local stage (keep 0.5: 2 of 3 windows folded) then hf_bipartite keep 0.7 at block 6, on the baseline's weights, no training; CamVid val, 101 images at 360x480 (690 tokens)",
    columns=columns(
        "ranking block prop_attn backbone_gmacs miou_free",
        ranking=text("windows folded by", "ranking"),
        block=text("block", "block", left=False),
        prop_attn=text("proportional attention", "prop_attn", left=False),
    ),
    rows=rows,
)
for r in rows:
    print(r["key"], round(r["miou_free"], 2))
