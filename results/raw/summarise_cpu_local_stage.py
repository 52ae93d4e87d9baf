# ruff: noqa: E501  (provenance strings: commands as they ran)
"""Summarise tools/benchmark.py's benchmark.json (models against the baseline) into a results/ file.

The provenance script of results/cpu_vit-s_local-stage.json and results/cpu_vit-s_default.json;
run from the repository root: ``RAW OUT COMMIT [NAMES_JSON TITLE [NOTE]]``, NAMES_JSON mapping each
timed config name to ``[label, config path or null, in README (optional)]`` (default: the local-stage file's).
"""

import json
import sys

from _common import MACHINE, columns, raw, text, write

d = raw()
NAME = {
    "fatr_ade20k": ("FATR default (`fatr`)", "configs/fatr_ade20k.py"),
    "fatr-local_vit-s_mask_8xb1-160k_ade20k-512x512": (
        "**FATR local stage (`fatr_local`)**",
        "configs/fatr-local_vit-s_mask_8xb1-160k_ade20k-512x512.py",
    ),
}
TITLE = "the default and fatr_local against the unreduced model"
if len(sys.argv) > 4:
    NAME, TITLE = json.loads(sys.argv[4]), sys.argv[5]
base = {(t["target"], t["batch"]): t for t in d["timing"] if t["config"] == "baseline_vit-s_ade20k"}
rows = []
for t in d["timing"]:
    if t["config"] not in NAME:
        continue
    b = base[(t["target"], t["batch"])]
    name, config, *readme = NAME[t["config"]]  # a third item: the row is in README's table
    rows.append(dict(
        target=t["target"], batch=t["batch"], method=name, **({"config": config} if config else {}),
        **({"readme": "yes"} if readme and readme[0] else {}),
        base_images_s=b["images_per_s"]["median"], images_s=t["images_per_s"]["median"],
        speedup=t["speedup"], speedup_paired=t["speedup_paired"],
        ideal=1.0 / t["macs_ratio"], of_ideal=t["speedup_per_ideal"],
    ))  # fmt: skip
write(
    title=f"CPU speed, Segmenter-Mask ViT-S/16 at 512² (1024 tokens), fp32, 1 thread: {TITLE}",
    how=" (tools/benchmark.py's benchmark.json)",
    date=d["date"],
    machine=f"{MACHINE}; load average {d['machine']['load_avg']} (speed-ups are of models alternating in one process)",
    command=[
        d["command"],
    ],
    protocol="random weights (speed does not depend on them), synthetic 512² inputs; the configs alternate, 1 warm-up and 7 timed rounds, median"
    + (
        "; each call timed by its thread's CPU time (--cpu-time), so other processes do not count"
        if d["settings"].get("cpu_time")
        else ""
    )
    + "; speed-up = baseline median time / model median time, paired = median of per-round ratios; ideal = the MACs ratio's inverse",
    columns=columns(
        "method target batch images_s speedup ideal",
        target=text("timed", "target"),
        batch=text("batch", "batch", left=False),
        images_s={
            "label": "images/s, baseline → model",
            "format": "{base_images_s:.3f} → {images_s:.3f}",
        },
        speedup={"label": "speed-up (paired)", "format": "{speedup:.2f}× ({speedup_paired:.2f}×)"},
        ideal={"label": "MACs ideal", "format": "{ideal:.2f}×"},
    ),
    rows=rows,
    **({"commit_note": sys.argv[6]} if len(sys.argv) > 6 else {}),
)
for r in rows:
    print(
        r["target"], r["batch"], r["method"], round(r["speedup"], 3), round(r["speedup_paired"], 3)
    )
