"""The back-end of ``tools/get_flops.py``: MACs of configs side by side (:func:`compare`), and the
paper's MAC table counted on its classification ViTs (:func:`paper_table`); schemas in the tool.
"""

from __future__ import annotations

import datetime
import os.path as osp

import torch

from ..layers import FATRVisionTransformer
from .benchmark_models import build_segmentor, patch_tokens, segmentor_macs
from .flops import analytic_vit_macs, count_macs
from .tables import markdown_table

__all__ = ["PAPER_MACS", "PAPER_REDUCTION", "TOLERANCE", "compare", "format_compare",
           "format_paper_table", "paper_table"]  # fmt: skip

# The paper's MAC table (Lee et al., NeurIPS 2025; see ../shared/paper.md, "Cost check"):
# (name, input size, patch size, embed dim, heads, baseline GMACs, FATR GMACs).
PAPER_MACS = (
    ("DeiT-T/16", 224, 16, 192, 3, 1.3, 0.8),
    ("DeiT-S/16", 224, 16, 384, 6, 4.6, 3.0),
    ("DeiT-B/16", 224, 16, 768, 12, 17.6, 11.6),
    ("ViT-S/16", 384, 16, 384, 6, 15.5, 9.9),
    ("ViT-B/16", 384, 16, 768, 12, 55.5, 35.9),
    ("ViT-B/8", 224, 8, 768, 12, 78.3, 50.0),
)
# The reduction of that table: layers 4/7/10, keep 0.7, DC windows (2, 1, 1).
PAPER_REDUCTION = dict(method="fatr", layers=(4, 7, 10), keep_ratio=0.7, aggregate="dc",
                       windows=(2, 1, 1), score="exact", reweight="identity",
                       restore="dc")  # fmt: skip
TOLERANCE = 0.02  # the band within which our counts must reproduce the paper's table
PAPER_DECIMALS = 1  # the paper prints GMACs with one decimal


def compare(paths: list[str], shape: tuple[int, int], cfg_options: dict | None = None) -> dict:
    """MACs of each config at ``shape`` with ratios against the first (schema
    ``fatr_seg.get_flops/1``)."""
    models, tokens = [], None
    for path in paths:
        model = build_segmentor(path, cfg_options=cfg_options)[0]
        tokens = patch_tokens(model, shape) if tokens is None else tokens
        macs = segmentor_macs(model, torch.zeros(1, 3, *shape))
        head = macs["segmentor"].macs - macs["backbone"].macs
        models.append(dict(config=path, name=osp.splitext(osp.basename(path))[0],
                           **{t: r.to_dict() for t, r in macs.items()},
                           decode_head_macs=head))  # fmt: skip
    ref = models[0]
    for m in models:
        m["ratio"] = {t: m[t]["macs"] / ref[t]["macs"] if ref[t]["macs"] else float("nan")
                      for t in ("backbone", "segmentor")}  # fmt: skip
    return dict(schema="fatr_seg.get_flops/1", unit="MACs", shape=list(shape), tokens=tokens,
                torch=torch.__version__, date=datetime.date.today().isoformat(),
                models=models)  # fmt: skip


def format_compare(result: dict) -> str:
    """Markdown table of :func:`compare`'s result."""
    H, W = result["shape"]
    header = ["config", "backbone GMACs", "ratio", "of which scoring", "DC term",
              "segmentor GMACs", "ratio", "decode head GMACs"]  # fmt: skip
    rows = [[m["name"], f"{m['backbone']['gmacs']:.3f}", f"{m['ratio']['backbone']:.3f}",
             f"{m['backbone']['scoring_macs'] / 1e9:.3f}",
             f"{m['backbone']['dc_term_macs'] / 1e9:.4f}", f"{m['segmentor']['gmacs']:.3f}",
             f"{m['ratio']['segmentor']:.3f}", f"{m['decode_head_macs'] / 1e9:.3f}"]
            for m in result["models"]]  # fmt: skip
    return (f"MACs for one {H}x{W} image ({result['tokens']} patch tokens), torch "
            f"{result['torch']}\n\n" + markdown_table(header, rows).rstrip())  # fmt: skip


def _within_rounding(ours: float, paper: float) -> bool:
    # The paper's value v printed with one decimal stands for [v - 0.05, v + 0.05].
    return abs(round(ours, PAPER_DECIMALS) - paper) < 1e-9 or abs(ours - paper) <= 0.05


def paper_table(only: list[str] | None = None) -> dict:
    """The paper's classification ViTs of :data:`PAPER_MACS` (``only``: these names) counted,
    baseline and FATR with and without its overhead (schema ``fatr_seg.get_flops.paper_table/1``);
    a ``RuntimeError`` when FATR's count without overhead differs from the closed form
    (:func:`.flops.analytic_vit_macs`): the counter is wrong."""
    rows = []
    for name, size, patch, dim, heads, paper_base, paper_fatr in PAPER_MACS:
        if only and name not in only:
            continue
        x = torch.zeros(1, 3, size, size)
        grid = (size // patch, size // patch)
        counted = {}
        for key, red in (("baseline", None), ("fatr", PAPER_REDUCTION)):
            vit = FATRVisionTransformer(img_size=size, patch_size=patch, embed_dims=dim,
                                        num_layers=12, num_heads=heads, reduction=red)  # fmt: skip
            vit.eval()
            counted[key] = count_macs(vit, x)
        fatr = counted["fatr"]
        tokens_only = fatr.macs - fatr.scoring_macs - fatr.dc_term_macs
        # Cross-check of the counter against the closed form (same schedule, no overhead).
        analytic = analytic_vit_macs(
            grid, dim, 12, patch, reduction=PAPER_REDUCTION, scoring=False, dc_term=False
        )
        if analytic != tokens_only:
            raise RuntimeError(f"{name}: counter {tokens_only} != closed form {analytic} MACs")
        ours = dict(baseline=counted["baseline"].macs / 1e9, fatr_counted=fatr.macs / 1e9,
                    fatr_tokens_only=tokens_only / 1e9)  # fmt: skip
        paper = dict(baseline=paper_base, fatr_counted=paper_fatr, fatr_tokens_only=paper_fatr)
        rows.append(dict(
            model=name, input=size, patch=patch, tokens=grid[0] * grid[1], **ours,
            scoring_overhead=fatr.scoring_macs / 1e9, dc_term_overhead=fatr.dc_term_macs / 1e9,
            paper_baseline=paper_base, paper_fatr=paper_fatr,
            rel_diff={k: v / paper[k] - 1.0 for k, v in ours.items()},
            within_rounding={k: _within_rounding(v, paper[k]) for k, v in ours.items()},
        ))  # fmt: skip
    return dict(schema="fatr_seg.get_flops.paper_table/1", unit="GMACs", tolerance=TOLERANCE,
                reduction=PAPER_REDUCTION, torch=torch.__version__,
                date=datetime.date.today().isoformat(), rows=rows)  # fmt: skip


def format_paper_table(result: dict) -> str:
    """Markdown table of :func:`paper_table`'s result, with the differences to the paper."""

    def cell(row, key):
        rel = row["rel_diff"][key]
        flag = "" if abs(rel) <= TOLERANCE else (" (r)" if row["within_rounding"][key] else " !")
        return f"{row[key]:.3f} ({rel:+.1%}){flag}"

    header = ["model", "input", "tokens", "paper base", "ours base", "paper FATR",
              "ours FATR tokens only", "ours FATR counted", "scoring", "DC term"]  # fmt: skip
    rows = [[r["model"], r["input"], r["tokens"], f"{r['paper_baseline']:.1f}",
             cell(r, "baseline"), f"{r['paper_fatr']:.1f}", cell(r, "fatr_tokens_only"),
             cell(r, "fatr_counted"), f"{r['scoring_overhead']:.3f}",
             f"{r['dc_term_overhead']:.4f}"] for r in result["rows"]]  # fmt: skip
    return (
        "GMACs per image; FATR at layers 4/7/10, keep 0.7, windows (2, 1, 1). Relative "
        "difference to the paper in brackets.\nfatr counted = everything our counter sees, "
        "exact-score overhead included; tokens only = minus the scoring and DC-term matmuls.\n\n"
        + markdown_table(header, rows)
        + f"\n(r): outside ±{TOLERANCE:.0%} but equal to the paper's value at its printed "
        "precision (one decimal); !: outside both."
    )
