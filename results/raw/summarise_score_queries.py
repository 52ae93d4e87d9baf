# ruff: noqa: E501  (provenance strings: commands and protocol as they ran)
"""Summarise the score_queries study (a camvid_study results.json, --finetune-as unreduced) into
results/camvid_vit-t_score-queries.json; run from the repository root: ``RAW OUT COMMIT``."""

import statistics

from _common import MACHINE, columns, frontier_run, paired, paired_delta, raw, speedups, text, write

data = raw()
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
        frontier_run("work_dirs/cs_sq")
        + " --variants 'q64={\"method\":\"fatr_local\",\"score_queries\":64}' 'q128={...:128}' 'q256={...:256}'   # ft_none_s0..2 copied from the frontier study (same settings)",
    ],
    protocol="as results/camvid_vit-t_frontier.json: the unreduced model fine-tuned per seed, the reduction applied to its weights; Δ paired over seeds 0, 1, 2 ± standard error; speed: whole segmentor at 360x480, 1 thread, the five models alternating",
    columns=columns(
        "queries miou_free miou_ft delta_exact delta_none speedup",
        queries=text("query rows Q", "queries"),
        delta_exact=paired_delta("Δ vs exact (paired)", "delta_exact"),
        delta_none=paired_delta("Δ vs none (paired)", "delta_none", empty=False),
    ),
    rows=rows,
)
for r in rows:
    print(r)
