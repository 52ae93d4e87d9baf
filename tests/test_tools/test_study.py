"""``tools/study.py --quick`` end to end: trains, evaluates, measures and reports every reducer."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
METHODS = ("fatr", "evit", "tome", "random")


@pytest.mark.slow
def test_quick_study_runs_end_to_end(tmp_path):
    work = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "study.py"), "--quick", "--threads", "1",
         "--work-dir", str(work)],
        cwd=tmp_path, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((work / "results.json").read_text())
    st, runs = data["settings"], data["runs"]
    assert st["quick"] and st["seeds"] == 1 and st["depth"] == 12

    for name in ("none", *METHODS):
        for phase in ("free", "ft"):
            miou = runs[f"s0/{name}/{phase}/miou"]
            assert 0.0 <= miou <= 100.0
            diag = runs[f"s0/{name}/{phase}/diag"]
            assert all(len(v) == st["depth"] for v in diag.values())
            assert all(0.0 <= h <= 1.0 + 1e-6 for h in diag["hf_restored"] + diag["hf_tokens"])
            assert math.isclose(diag["cos_to_last"][-1], 1.0, abs_tol=1e-5)
    # The token budget: 16 patches, keep 0.7 at blocks 4/7/10 -> 12, 9, 7 patch tokens.
    assert runs["budget"]["kept_per_layer"] == [12, 9, 7]
    tokens = {m: runs[f"s0/{m}/free/diag"]["num_tokens"] for m in ("none", *METHODS)}
    assert tokens["none"] == [16.0] * 12
    assert tokens["tome"] == [16.0] * 3 + [12.0] * 3 + [9.0] * 3 + [7.0] * 3
    # EViT: the fused token competes for a place at the next layer (as in EViT's code), so the
    # budget is taken of the 13 and 11 tokens present: 12 + 1, ceil(0.7·13) + 1, ceil(0.7·11) + 1
    assert tokens["evit"] == [16.0] * 3 + [13.0] * 3 + [11.0] * 3 + [9.0] * 3
    assert tokens["fatr"] == [16.0] * 3 + [16.0] * 3 + [13.0] * 3 + [8.0] * 3  # + DC (2,2,1)
    # Training-free, nothing changes before the first reduction block.
    for m in METHODS:
        ref = runs["s0/none/free/diag"]["hf_restored"][:3]
        got = runs[f"s0/{m}/free/diag"]["hf_restored"][:3]
        assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(ref, got, strict=True))
    # Cost: attention is counted (the custom handler), and every reducer is cheaper.
    macs = runs["macs"]
    assert all(macs[m] < macs["none"] for m in METHODS)
    assert all(v > 0 for v in runs["images_per_s"].values())
    for pair in ("fatr_evit/free", "fatr_evit/ft", "fatr_random/free"):
        iou = runs[f"s0/iou/{pair}"]
        assert len(iou) == 3 and all(0.0 <= v <= 1.0 for v in iou)

    table = (work / "table.md").read_text()
    for name in ("none", *METHODS):
        assert f"| {name} |" in table
    assert "n/a" not in table.split("## Per-layer")[0]
    for png in ("rank_collapse.png", "miou.png", "hf_iou.png"):
        assert (work / png).stat().st_size > 1000


def test_attention_flops_are_counted():
    """The study's MAC count sees the fused CPU attention op (torch has no formula for it)."""
    import torch
    import torch.nn.functional as F

    from fatr_seg.analysis.study import forward_macs

    class Attention(torch.nn.Module):
        def forward(self, x, mode="tensor"):
            q = x.reshape(1, 2, 8, 12)  # (B, h, n, d) from the (1, 3, 8, 8) input
            return F.scaled_dot_product_attention(q, q, q, scale=0.3)

    assert forward_macs(Attention(), 8) == 1 * 2 * (2 * 8 * 8 * 12)  # QKᵀ and AV per head


def test_kept_set_iou_counts_cells_and_skips_tokens_without_one():
    from fatr_seg.analysis.rank_collapse import kept_set_iou

    a = torch.tensor([[0, 1, 2, -1], [3, 3, 4, 5]])  # -1: EViT's fused token, no grid cell
    b = torch.tensor([[1, 2, 5, -1], [3, 4, 5, 6]])
    iou = kept_set_iou(a, b, num_patches=8)
    assert iou.tolist() == pytest.approx([2 / 4, 3 / 4])
