"""What the demo reads back from its tools, and the summary it writes (``tools/demo.py``).

The readers follow the tools' own outputs: mmengine's metrics JSON and mmseg's per-class table
from ``tools/test.py``, the JSON of ``tools/get_flops.py`` and ``tools/benchmark.py``. A file
that does not hold what is expected raises :class:`DemoError` naming it.
"""

from __future__ import annotations

import glob
import json
import os.path as osp

from .tables import fmt, markdown_table

__all__ = ["DemoError", "format_summary", "parse_per_class", "read_gmacs", "read_test_metrics",
           "read_throughput"]  # fmt: skip


class DemoError(RuntimeError):
    """A step failed; the message is the one line shown to the user."""


def read_test_metrics(test_dir):
    """mIoU, aAcc, mAcc (%) and per-class IoU of the newest run of ``tools/test.py``
    (``TEST_DIR/<stamp>/<stamp>.json``, the per-class table in ``<stamp>.log``)."""
    runs = sorted(glob.glob(osp.join(test_dir, "*", "*.json")), key=osp.getmtime)
    if not runs:
        raise DemoError(f"tools/test.py wrote no metrics under {test_dir}")
    with open(runs[-1]) as f:
        lines = [json.loads(s) for s in f if s.strip()]
    metrics = next((m for m in reversed(lines) if "mIoU" in m), None)
    if metrics is None:
        raise DemoError(f"no mIoU in {runs[-1]}")
    result = {k: float(metrics[k]) for k in ("mIoU", "aAcc", "mAcc") if k in metrics}
    result["per_class"] = parse_per_class(runs[-1][: -len(".json")] + ".log")
    return result


def parse_per_class(log_path):
    """``{class: IoU}`` from the table mmseg's IoUMetric prints (empty if there is none)."""
    if not osp.isfile(log_path):
        return {}
    with open(log_path) as f:
        text = f.read()
    start = text.rfind("per class results:")
    if start < 0:
        return {}
    table = {}
    for line in text[start:].splitlines()[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0] != "Class":
            try:
                table[cells[0]] = float(cells[1])
            except ValueError:
                continue
        elif table and not line.startswith(("+", "|")):
            break
    return table


def _values(path, configs, records, field, what, note=""):
    """``{config: float(record[field[0]][field[1]])}`` for each of ``configs``, from ``records``
    (normalised config path -> the tool's record of it); a :class:`DemoError` naming ``path``
    and the first config without a record or a number there (``what`` of it, ``note`` added)."""
    found = {}
    for cfg in configs:
        try:
            found[cfg] = float(records[osp.normpath(cfg)][field[0]][field[1]])
        except (KeyError, TypeError, ValueError):
            raise DemoError(f"{path} does not hold {what} of {cfg}{note} ({'.'.join(field)}; has "
                            "its tool's JSON schema changed?)") from None  # fmt: skip
    return found


def read_gmacs(path, configs):
    """``{config: segmentor GMACs}`` from ``tools/get_flops.py --json``."""
    with open(path) as f:
        data = json.load(f)
    records = {osp.normpath(str(m.get("config", ""))): m for m in data.get("models", [])}
    return _values(path, configs, records, ("segmentor", "gmacs"), "MACs")


def read_throughput(path, configs):
    """``{config: images/s}`` (median, segmentor, batch 1) from ``tools/benchmark.py``'s JSON."""
    if not osp.isfile(path):
        raise DemoError(f"tools/benchmark.py wrote no {path}")
    with open(path) as f:
        data = json.load(f)
    paths = {c["name"]: osp.normpath(c["path"]) for c in data.get("configs", []) if "path" in c}
    records = {}
    for rec in data.get("timing", []):
        if rec.get("target") == "segmentor" and rec.get("config") in paths:
            records.setdefault(paths[rec["config"]], rec)
    skipped = "; ".join(str(s.get("reason")) for s in data.get("skipped", []))
    note = f" (skipped: {skipped})" if skipped else ""
    return _values(path, configs, records, ("images_per_s", "median"), "a segmentor timing", note)


def _ratio(num, den):
    return "n/a" if num is None or den in (None, 0) else f"{num / den:.2f}x"


def format_summary(results):
    """Markdown summary of :func:`run_demo`'s ``results``: one row per evaluated model with its
    mIoU and its config's cost, then ratios, threads, pictures and step times."""
    base, fatr, size = results["baseline_config"], results["fatr_config"], results["size"]
    miou, models = results.get("miou", {}), results.get("models", [])
    gmacs = results.get("bench", {}).get("gmacs", {})
    ips = results.get("bench", {}).get("throughput", {})
    how = {
        "baseline": f"trained from scratch, {results.get('max_iters', '?')} iterations",
        "fatr_training_free": "the baseline's weights, no training",
        "fatr_finetuned": f"the baseline's weights + {results.get('finetune_iters')} iterations "
        f"of self-distillation (`{results.get('distill_config')}`)",
    }
    rows = [[row["label"], f"`{row['config']}`", how.get(row["key"], ""),
             fmt(miou.get(row["key"], {}).get("mIoU"), ".2f", "n/a"),
             fmt(gmacs.get(row["config"]), ".3f", "n/a"), fmt(ips.get(row["config"]), ".2f", "n/a")]
            for row in models]  # fmt: skip
    lines = [
        "# fatr_seg demo summary", "",
        f"Synthetic ADE20K-layout data ({results['num_train']} train / {results['num_val']} val, "
        f"{size}x{size}), ViT-T/16 with Segmenter's linear decoder, on {results['device']}. "
        "The baseline is trained, then turned into FATR: first training-free (its checkpoint in "
        "the FATR config), then fine-tuned by self-distillation from it.",
        f"mIoU on the {results['num_val']} validation images; cost and throughput: one "
        f"{size}x{size} image (batch 1), whole segmentor.", "",
        markdown_table(["model", "config", "weights", "mIoU (%)", "GMACs", "images/s"], rows,
                       ["left"] * 3 + ["right"] * 3),
        f"- FATR / baseline GMACs: {_ratio(gmacs.get(fatr), gmacs.get(base))}",
        f"- FATR / baseline images/s: {_ratio(ips.get(fatr), ips.get(base))}",
    ]  # fmt: skip
    base_miou = miou.get("baseline", {}).get("mIoU")
    for row in models[1:]:
        m = miou.get(row["key"], {}).get("mIoU")
        if m is not None and base_miou is not None:
            lines.append(f"- {row['label']} - baseline mIoU: {m - base_miou:+.2f} points")
    labels = {"baseline": "baseline", "fatr_finetune": "FATR fine-tuning (student + teacher)"}
    timed = [(labels.get(k, k), v) for k, v in results.get("train_speed", {}).items()
             if v is not None]  # fmt: skip
    if timed:
        lines.append("- training, median s/iteration: "
                     + ", ".join(f"{label} {v:.2f}" for label, v in timed))  # fmt: skip
    threads = results.get("threads")
    lines.append(f"- CPU threads of every tool: {threads or 'torch default, one per core'}")
    for row in models:
        per_class = miou.get(row["key"], {}).get("per_class")
        if per_class:
            lines += ["", f"{row['label']} per-class IoU (%): " + ", ".join(
                f"{k} {v:.1f}" for k, v in per_class.items())]  # fmt: skip
    if results.get("pictures"):
        lines += ["", "Token maps of the last FATR model (HF tokens kept vs patches aggregated "
                  "into other tokens):"]  # fmt: skip
        lines += [f"![{osp.basename(p)}]({osp.basename(p)})" for p in results["pictures"]]
    total = results.get("total_s", sum(results["timings"].values()))
    steps = [[k, f"{v:.1f}"] for k, v in results["timings"].items()]
    steps.append(["**total (wall clock, start-up included)**", f"**{total:.1f}**"])
    return "\n".join(lines + ["", markdown_table(["step", "seconds"], steps)])
