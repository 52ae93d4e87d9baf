# ruff: noqa: E501  (provenance strings: commands and protocol as they ran)
"""Summarise the score_queries study (a camvid_study results.json, --finetune-as unreduced) into
results/camvid_vit-t_score-queries.json; run from the repository root: ``RAW OUT COMMIT``."""

import json
import statistics

from _common import MACHINE, argv, columns, paired, speedups, text, write

raw_path, out_path, commit = argv()
data = json.load(open(raw_path))
runs, seeds = data["runs"], data["settings"]["seeds"]
rows = []
for key, q in (("fatr_local", None), ("q256", 256), ("q128", 128), ("q64", 64)):
    diffs = [runs[f"deploy/{key}/s{s}"]["mIoU"] - runs[f"deploy/fatr_local/s{s}"]["mIoU"]
             for s in seeds]  # fmt: skip
    unreduced = [runs[f"deploy/{key}/s{s}"]["mIoU"] - runs[f"ft/none/s{s}"]["mIoU"] for s in seeds]
    row = dict(
        queries="exact (all rows)" if q is None else str(q),
        miou_free=runs[f"free/{key}"]["mIoU"],
        miou_ft=statistics.fmean(runs[f"deploy/{key}/s{s}"]["mIoU"] for s in seeds),
    )
    row["delta_none"], row["delta_none_se"] = paired(unreduced)
    row.update(speedups(runs["cost"], key))
    if q is not None:
        row["delta_exact"], row["delta_exact_se"] = paired(diffs)
    rows.append(row)
write(
    title="CamVid val, ViT-Ti/16, the default (fatr_local): the HF score from Q strided query rows against the exact score, on the same fine-tuned weights (3 paired seeds), CPU speed",
    date="2026-12-07",
    machine=f"{MACHINE}, loaded (models alternate in one process)",
    command=[
        "python tools/camvid_study.py --data-root ../shared/data/camvid --baseline-checkpoint baseline_500_352.pth --work-dir work_dirs/cs_sq --model-config configs/camvid/fatr_vit-t_camvid.py --methods none fatr_local --seeds 0 1 2 --ft-iters 100 --base-iters 500 --crop-size 352 --threads 2 --finetune-as unreduced --variants 'q64={\"method\":\"fatr_local\",\"score_queries\":64}' 'q128={...:128}' 'q256={...:256}'   # ft_none_s0..2 copied from the frontier study (same settings)",
    ],
    protocol="as results/camvid_vit-t_frontier.json: the unreduced model fine-tuned per seed, the reduction applied to its weights; Δ paired over seeds 0, 1, 2 ± standard error; speed: whole segmentor at 360x480, 1 thread, the five models alternating",
    columns=columns(
        "queries miou_free miou_ft delta_exact delta_none speedup",
        queries=text("query rows Q", "queries"),
        miou_ft={"label": "mIoU fine-tuned", "format": "{miou_ft:.2f}"},
        delta_exact={
            "label": "Δ vs exact (paired)",
            "format": "{delta_exact:+.2f} ± {delta_exact_se:.2f}",
            "empty": "—",
        },
        delta_none={
            "label": "Δ vs none (paired)",
            "format": "{delta_none:+.2f} ± {delta_none_se:.2f}",
        },
    ),
    rows=rows,
)
for r in rows:
    print(r)
