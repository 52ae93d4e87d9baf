# ruff: noqa: E501  (provenance strings: commands and protocol as they ran)
"""Summarise the score_queries study (a camvid_study results.json, --finetune-as unreduced) into
results/camvid_vit-t_score-queries.json; run from the repository root: ``RAW OUT COMMIT``."""

import json
import math
import statistics
import sys

raw_path, out_path, commit = sys.argv[1:4]
data = json.load(open(raw_path))
runs, seeds = data["runs"], data["settings"]["seeds"]
ips = runs["cost"]["images_per_s"]
rows = []
for key, q in (("fatr_local", None), ("q256", 256), ("q128", 128), ("q64", 64)):
    diffs = [runs[f"deploy/{key}/s{s}"]["mIoU"] - runs[f"deploy/fatr_local/s{s}"]["mIoU"]
             for s in seeds]  # fmt: skip
    unreduced = [runs[f"deploy/{key}/s{s}"]["mIoU"] - runs[f"ft/none/s{s}"]["mIoU"] for s in seeds]
    row = dict(
        queries="exact (all rows)" if q is None else str(q),
        miou_free=runs[f"free/{key}"]["mIoU"],
        miou_ft=statistics.fmean(runs[f"deploy/{key}/s{s}"]["mIoU"] for s in seeds),
        delta_none=statistics.fmean(unreduced),
        delta_none_se=statistics.stdev(unreduced) / math.sqrt(len(seeds)),
        speedup_b1=ips["b1"][key]["median"] / ips["b1"]["none"]["median"],
        speedup_b8=ips["b8"][key]["median"] / ips["b8"]["none"]["median"],
    )
    if q is not None:
        row["delta_exact"] = statistics.fmean(diffs)
        row["delta_exact_se"] = statistics.stdev(diffs) / math.sqrt(len(seeds))
    rows.append(row)
out = dict(
    title="CamVid val, ViT-Ti/16, the default (fatr_local): the HF score from Q strided query rows against the exact score, on the same fine-tuned weights (3 paired seeds), CPU speed",
    source=f"summarised from results/raw/{raw_path.split('/')[-1]} by the command's last line",
    date="2026-12-07",
    commit=commit,
    machine="the project's 2-core x86_64 CPU machine, no GPU, loaded (models alternate in one process)",
    command=[
        "python tools/camvid_study.py --data-root ../shared/data/camvid --baseline-checkpoint baseline_500_352.pth --work-dir work_dirs/cs_sq --model-config configs/camvid/fatr_vit-t_camvid.py --methods none fatr_local --seeds 0 1 2 --ft-iters 100 --base-iters 500 --crop-size 352 --threads 2 --finetune-as unreduced --variants 'q64={\"method\":\"fatr_local\",\"score_queries\":64}' 'q128={...:128}' 'q256={...:256}'   # ft_none_s0..2 copied from the frontier study (same settings)",
        "python results/raw/summarise_score_queries.py results/raw/camvid_vit-t_score-queries_study.json results/camvid_vit-t_score-queries.json COMMIT",
    ],
    protocol="as results/camvid_vit-t_frontier.json: the unreduced model fine-tuned per seed, the reduction applied to its weights; Δ paired over seeds 0, 1, 2 ± standard error; speed: whole segmentor at 360x480, 1 thread, the five models alternating",
    columns={
        "queries": {"label": "query rows Q", "align": "left", "format": "{queries}"},
        "miou_free": {"label": "mIoU training-free", "format": "{miou_free:.2f}"},
        "miou_ft": {"label": "mIoU fine-tuned", "format": "{miou_ft:.2f}"},
        "delta_exact": {
            "label": "Δ vs exact (paired)",
            "format": "{delta_exact:+.2f} ± {delta_exact_se:.2f}",
            "empty": "—",
        },
        "delta_none": {
            "label": "Δ vs none (paired)",
            "format": "{delta_none:+.2f} ± {delta_none_se:.2f}",
        },
        "speedup": {"label": "speed-up b1 / b8", "format": "{speedup_b1:.2f}× / {speedup_b8:.2f}×"},
    },
    rows=rows,
)
json.dump(out, open(out_path, "w"), indent=1, ensure_ascii=False)
for r in rows:
    print(r)
