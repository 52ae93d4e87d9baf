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


def fatr_vit(checkpoint, reduction=None, **kwargs):
    """FATRViT with timm's ViT-Ti/16 settings, loaded through ``init_cfg`` (strict), eval mode."""
    from mmseg.registry import MODELS

    import fatr_seg.models  # noqa: F401  (registers FATRViT)

    # timm's settings (FATRViT's own defaults are mmseg's: no patch bias, no final norm, eps 1e-5)
    timm = dict(img_size=224, patch_size=16, embed_dims=192, num_layers=12, num_heads=3,
                patch_bias=True, final_norm=True, norm_cfg=dict(type="LN", eps=1e-6))  # fmt: skip
    kwargs = timm | kwargs
    init_cfg = dict(type="Pretrained", checkpoint=str(checkpoint))
    model = MODELS.build(dict(type="FATRViT", reduction=reduction, init_cfg=init_cfg, **kwargs))
    model.init_weights()
    return model.eval()


def load_real_vit_ti(cfg):
    """``(backbone state, file tensors)``: the model of ``cfg`` (whose init_cfg names the ViT-Ti
    file) built and initialised from the real file, and the file without its classifier."""
    from mmseg.registry import MODELS
    from safetensors.torch import load_file

    assert cfg.model.backbone.init_cfg.checkpoint.endswith(REAL_VIT_TI.name)
    cfg.model.backbone.init_cfg.checkpoint = str(REAL_VIT_TI)
    model = MODELS.build(cfg.model)
    model.init_weights()
    file = {k: v for k, v in load_file(str(REAL_VIT_TI)).items() if not k.startswith("head.")}
    return model.backbone.state_dict(), file
