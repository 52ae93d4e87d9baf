"""Issue 24, item 2: the query-subsampled HF score against the exact one, on real images.

ViT-Ti/16 (timm's augreg weights, training-free) with the default reduction on CamVid val
images: at every reduction layer, the exact score's top sets (the protected top ``protect``
fraction, which is all the default reads of it, and the top ``keep_ratio`` fraction, which an
``'hf'`` layer keeps) against those of the estimate from ``Q`` strided query rows; the tokens the
whole default reduction keeps with the estimate against with the exact score; and the scoring
time on CPU (1 thread) at this size and at ViT-S 512² / 1024² shapes.

    python tools/hf_score_estimate.py \\
        --weights /work/shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors \\
        --images /work/shared/data/camvid/images/val --out results/hf_score_estimate.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fatr_seg.layers import FATRVisionTransformer  # noqa: E402
from fatr_seg.layers.reducer import TokenReducer  # noqa: E402
from fatr_seg.ops import attention_with_lse, hf_scores  # noqa: E402


def load_images(folder: Path, num: int) -> list[torch.Tensor]:
    from PIL import Image

    out = []
    for path in sorted(folder.glob("*.*"))[:num]:
        img = torch.frombuffer(bytearray(Image.open(path).convert("RGB").tobytes()),
                               dtype=torch.uint8)  # fmt: skip
        w, h = Image.open(path).size
        img = img.view(h, w, 3).permute(2, 0, 1).float() / 255.0
        out.append(((img - 0.5) / 0.5)[None])
    return out


def top_set(s: torch.Tensor, k: int) -> set[int]:
    return set(torch.sort(s, descending=True, stable=True).indices[:k].tolist())


def iou(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def thread_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


# Scoring-time shapes: (name, tokens or None for the first image's real activations, heads, d).
TIMING_SHAPES = (("ViT-Ti CamVid (real)", None, 3, 64), ("ViT-S 512²", 1025, 6, 64),
                 ("ViT-S 1024²", 4097, 6, 64))  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--num-images", type=int, default=30)
    ap.add_argument("--queries", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--out", default="results/hf_score_estimate.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    model = FATRVisionTransformer(img_size=224, patch_size=16, embed_dims=192, num_layers=12,
                                  num_heads=3, reduction=dict(method="fatr")).eval()  # fmt: skip
    sd = {k: v for k, v in load_file(args.weights).items() if not k.startswith("head")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("omega" in k for k in missing), (missing, unexpected)
    cfg = model.reduction  # fatr: the exact score (score_queries None)
    reducers = [blk.reducer for blk in model.blocks if blk.reducer is not None]

    def use_queries(Q):  # the reducers read their config at forward time, as set_keep_ratio uses
        for r in reducers:
            r.cfg = dataclasses.replace(cfg, score_queries=Q)

    images = load_images(Path(args.images), args.num_images)

    # Per layer: IoU of the exact score's top sets with the estimate's, on the exact run's inputs.
    sets: dict = {}
    exact_score = TokenReducer.hf_score

    def probe(self, stats, state, key_bias, method="exact"):
        s = exact_score(self, stats, state, key_bias, method)
        M = state.num_patches
        keep = cfg.num_keep(self.j, M)
        fractions = {"protected": cfg.num_protected(M, keep), "keep": keep}
        for Q in args.queries:
            self.cfg = dataclasses.replace(cfg, score_queries=Q)
            e = exact_score(self, stats, state, key_bias, method)
            self.cfg = cfg
            for name, k in fractions.items():
                for b in range(s.shape[0]):
                    key = (cfg.layers[self.j], Q, name)
                    sets.setdefault(key, []).append(iou(top_set(s[b], k), top_set(e[b], k)))
        return s

    TokenReducer.hf_score = probe
    try:
        with torch.no_grad():
            exact_traces = [model.reduction_trace(x) for x in images]
    finally:
        TokenReducer.hf_score = exact_score
    # The kept tokens of the whole default reduction with the estimate.
    kept_iou: dict = {}
    with torch.no_grad():
        for Q in args.queries:
            use_queries(Q)
            for x, want in zip(images, exact_traces, strict=True):
                for a, b in zip(want, model.reduction_trace(x), strict=True):
                    kept_iou.setdefault((a.layer, Q), []).append(
                        iou(set(a.kept[0].tolist()), set(b.kept[0].tolist())))  # fmt: skip
        use_queries(None)

    # Scoring time, 1 thread, batch 1: real activations of the first layer, then random ones.
    timing = []
    for name, n, h, d in TIMING_SHAPES:
        if n is None:
            x, state = model.embed(images[0])
            blk = model.blocks[0]
            y, stats = blk.attn(blk.norm1(x), None, 0, True)
            q, k, lse = stats.q, stats.k, stats.lse
        else:
            torch.manual_seed(0)
            qkv = torch.randn(1, n, 3, h, d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            lse = attention_with_lse(q, k, v, d**-0.5)[1]
        row = {"shape": name, "tokens": q.shape[2], "heads": q.shape[1]}

        def score(Q=None, q=q, k=k, lse=lse, scale=d**-0.5):
            return hf_scores(q, k, scale, lse=lse, queries=Q)

        row["exact_ms"] = 1e3 * thread_time(score, 7)
        for Q in args.queries:
            row[f"q{Q}_ms"] = 1e3 * thread_time(lambda Q=Q: score(Q), 15)
        timing.append(row)

    def mean(v):
        return round(sum(v) / len(v), 4)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    result = {
        "what": "issue 24 item 2: HF score from strided query rows vs the exact column mean",
        "machine": f"{platform.processor() or platform.machine()}, {platform.node()}, 1 thread",
        "command": " ".join(sys.argv if argv is None else [sys.argv[0], *argv]),
        "commit": commit,
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "model": "ViT-Ti/16 augreg (training-free), default reduction (fatr), CamVid val",
        "images": len(images),
        "top_set_iou": [
            {"layer": layer, "queries": Q, "set": name, "iou": mean(v)}
            for (layer, Q, name), v in sorted(sets.items())
        ],  # fmt: skip
        "kept_iou": [
            {"layer": layer, "queries": Q, "iou": mean(v)}
            for (layer, Q), v in sorted(kept_iou.items())
        ],  # fmt: skip
        "scoring_time": timing,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
