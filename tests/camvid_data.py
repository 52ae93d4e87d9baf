"""Hand-made CamVid-like files for the tests, and where the real shared material lies.

Real data and weights (read-only, never part of the repository) are looked for in
``$FATR_SHARED`` or, by default, ``../shared`` next to the repository root; tests that need them
skip, naming the path, when they are absent.
"""

import os
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FATR_SHARED", REPO.parent / "shared"))
REAL_CAMVID = SHARED / "data" / "camvid"
REAL_VIT_TI = SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
SHARED_HINT = "set FATR_SHARED to the folder holding data/ and weights/"


def make_pair(rng, size=(36, 48)):
    """An RGB image and a label map with every value 0..11 (11 = void) in blocks of 4x4 pixels."""
    h, w = size
    blocks = rng.integers(0, 12, size=(-(-h // 4), -(-w // 4)))
    blocks.flat[:12] = np.arange(12)  # every class and void appear
    label = np.kron(blocks, np.ones((4, 4), dtype=np.int64))[:h, :w].astype(np.uint8)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return image, label


def write_split(img_dir, ann_dir, n, rng, size=(36, 48), suffix=".png", prefix="f"):
    """Write ``n`` pairs; returns ``{stem: (image, label)}``. PNG images are lossless."""
    img_dir, ann_dir = Path(img_dir), Path(ann_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    pairs = {}
    for i in range(n):
        stem = f"{prefix}{i:03d}"
        image, label = make_pair(rng, size)
        Image.fromarray(image).save(img_dir / f"{stem}{suffix}")
        Image.fromarray(label).save(ann_dir / f"{stem}.png")
        pairs[stem] = (image, label)
    return pairs


def write_camvid(root, counts, size=(36, 48), suffix=".png", seed=0):
    """Our layout under ``root``; returns ``{split: {stem: (image, label)}}``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    out = {}
    for split, n in counts.items():
        dirs = root / "images" / split, root / "labels" / split
        out[split] = write_split(*dirs, n, rng, size, suffix, prefix=f"{split}_")
    return out
