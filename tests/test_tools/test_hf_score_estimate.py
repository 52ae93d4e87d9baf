"""``tools/hf_score_estimate.py`` on tiny inputs: random ViT-Ti weights, two 64x96 images (24
patches), small timing shapes. With at least as many query rows as tokens the estimate is the
exact score (every IoU 1); with 4 rows it is not."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from fatr_seg.layers import FATRVisionTransformer

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "fatr_hf_score_estimate_tool", REPO / "tools" / "hf_score_estimate.py"
)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def test_estimate_is_exact_with_every_row_and_differs_with_few(tmp_path, monkeypatch):
    torch.manual_seed(0)
    vit = FATRVisionTransformer(img_size=224, patch_size=16, embed_dims=192, num_layers=12,
                                num_heads=3, reduction=dict(method="fatr"))  # fmt: skip
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "w.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        pixels = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    monkeypatch.setattr(tool, "TIMING_SHAPES", (("real", None, 3, 64), ("random", 65, 2, 16)))
    out = tmp_path / "out.json"
    result = tool.main(["--weights", str(tmp_path / "w.safetensors"), "--images", str(images),
                        "--queries", "4", "64", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == result and result["images"] == 2

    layers = (4, 7, 10)  # the default reduction's
    top = {(r["layer"], r["queries"], r["set"]): r["iou"] for r in result["top_set_iou"]}
    kept = {(r["layer"], r["queries"]): r["iou"] for r in result["kept_iou"]}
    assert set(top) == {(n, q, s) for n in layers for q in (4, 64) for s in ("protected", "keep")}
    assert set(kept) == {(n, q) for n in layers for q in (4, 64)}
    assert all(top[n, 64, s] == 1.0 and kept[n, 64] == 1.0 for n, _, s in top)
    assert min(top[k] for k in top if k[1] == 4) < 1.0
    assert all(0.0 <= v <= 1.0 for v in [*top.values(), *kept.values()])

    assert [r["shape"] for r in result["scoring_time"]] == ["real", "random"]
    assert result["scoring_time"][0]["tokens"] == 25 and result["scoring_time"][1]["tokens"] == 65
    for row in result["scoring_time"]:
        assert row["exact_ms"] > 0 and row["q4_ms"] > 0 and row["q64_ms"] > 0
