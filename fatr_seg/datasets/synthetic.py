"""Synthetic semantic segmentation data in ADE20K's layout, where high-frequency detail decides.

The demo must train and evaluate without ADE20K, so this module writes a
dataset that mmseg's ``ADE20KDataset`` and the stock ADE20K pipeline read unchanged::

    ROOT/images/training/ADE_train_00000001.jpg       RGB JPEG
    ROOT/annotations/training/ADE_train_00000001.png  single-channel uint8 PNG
    ROOT/images/validation/ADE_val_00000001.jpg
    ROOT/annotations/validation/ADE_val_00000001.png
    ROOT/fatr_synthetic.json                           written last: the set is complete

Labels follow ADE20K: 0 is "other" (``reduce_zero_label=True`` maps it to 255, ignored) and class
``k`` is stored as ``k`` (1..K), becoming ``k - 1`` after the reduction. ``ADE20KDataset`` rejects
``metainfo`` class names outside its own 150, so a config that wants ``CLASSES`` as names uses
``BaseSegDataset`` with ``img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True``.

The content is built so that a low-pass model cannot solve it:

* Texture classes (stripes of two frequencies and three orientations, two checker sizes, noise
  grain) are zero-mean +-1 patterns of the same amplitude around the same per-image base colour,
  so their mean colour and even their per-pixel variance are equal; only frequency and orientation
  tell them apart.
* The background is a smooth gradient around that same base colour.
* Thin lines and small blobs are their own classes; they vanish under pooling.
* A two-pixel band of label 0 along region borders exercises the ignore path.

Every image depends only on ``(seed, split, index)``, so any subset can be regenerated
byte-identically. Only numpy and Pillow are used.
"""

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = (
    "background",
    "stripes_fine_h",
    "stripes_fine_v",
    "stripes_coarse_d",
    "checker_small",
    "checker_large",
    "noise_grain",
    "line",
    "blob",
)
PALETTE = [
    [120, 120, 120],
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
]

# Label ids as written to the PNGs (ADE20K convention: 0 = other, classes from 1).
IGNORE = 0
BACKGROUND, LINE, BLOB = 1, 8, 9
TEXTURES = (2, 3, 4, 5, 6, 7)
REGION_CLASSES = (BACKGROUND, *TEXTURES)

SPLITS = {"training": ("train", 0), "validation": ("val", 1)}
MARKER = "fatr_synthetic.json"
# Bump when the generated content changes, so stale data on disk is regenerated.
GENERATOR_VERSION = 1
JPEG_QUALITY = 95


def _stripes(y, x, rng, period, angle_deg):
    """Square wave of +-1 with the given period (px) and normal direction (degrees from x)."""
    period = period * rng.uniform(0.9, 1.1)
    theta = np.deg2rad(angle_deg + rng.uniform(-8, 8))
    u = x * np.float32(np.cos(theta) / period) + y * np.float32(np.sin(theta) / period)
    return np.where((u + np.float32(rng.uniform())) % 1 < 0.5, 1.0, -1.0).astype(np.float32)


def _checker(y, x, rng, cell):
    oy, ox = rng.integers(0, cell, size=2)
    parity = ((y + oy) // cell + (x + ox) // cell) % 2
    return (2 * parity - 1).astype(np.float32)


def _grain(y, x, rng, shape, grain=2):
    h, w = shape
    cells = rng.choice(np.array([-1.0, 1.0], np.float32), size=(-(-h // grain), -(-w // grain)))
    return cells[y // grain, x // grain]


def _texture(label, y, x, rng, shape):
    """Zero-mean +-1 pattern of one texture class at integer pixel coordinates ``(y, x)``."""
    name = CLASSES[label - 1]
    if name == "stripes_fine_h":  # stripes run along x: intensity varies along y
        return _stripes(y, x, rng, 4.0, 90.0)
    if name == "stripes_fine_v":
        return _stripes(y, x, rng, 4.0, 0.0)
    if name == "stripes_coarse_d":
        return _stripes(y, x, rng, 10.0, rng.choice([45.0, 135.0]))
    if name == "checker_small":
        return _checker(y, x, rng, 3)
    if name == "checker_large":
        return _checker(y, x, rng, 8)
    if name == "noise_grain":
        return _grain(y, x, rng, shape)
    raise ValueError(f"not a texture class: {label}")


def _smooth_field(shape, rng, num_waves=3):
    """Zero-centred low-frequency field in [-1, 1]: a few long plane waves.

    ``sin(a x + b y + c)`` is separable, so each wave costs two outer products of 1-D vectors.
    """
    h, w = shape
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    field = np.zeros((h, w), np.float32)
    for _ in range(num_waves):
        theta = rng.uniform(0, 2 * np.pi)
        k = 2 * np.pi / (rng.uniform(1.0, 3.0) * max(h, w))
        fy = np.float32(k * np.sin(theta)) * y + np.float32(rng.uniform(0, 2 * np.pi))
        fx = np.float32(k * np.cos(theta)) * x
        field += np.sin(fx) * np.cos(fy) + np.cos(fx) * np.sin(fy)
    return field / np.float32(num_waves)


def _region_layout(shape, rng):
    """Region class map: a warped power diagram with a few ellipses and polygons on top."""
    h, w = shape
    scale = float(max(h, w))
    num_seeds = int(rng.integers(4, 10))
    seeds = (rng.uniform(0, 1, size=(num_seeds, 2)) * np.array([h, w])).astype(np.float32)
    weights = (rng.uniform(0, 0.04, size=num_seeds) * scale**2).astype(np.float32)
    # Low-frequency displacement bends the straight power-diagram borders.
    warp = np.float32(0.05 * scale)
    wy = np.arange(h, dtype=np.float32)[:, None] + warp * _smooth_field(shape, rng, 2)
    wx = np.arange(w, dtype=np.float32)[None, :] + warp * _smooth_field(shape, rng, 2)
    best = np.full((h, w), np.inf, np.float32)
    nearest = np.zeros((h, w), np.intp)
    for i, ((sy, sx), wt) in enumerate(zip(seeds, weights, strict=True)):
        dist = (wy - sy) ** 2 + (wx - sx) ** 2 - wt
        closer = dist < best
        best[closer] = dist[closer]
        nearest[closer] = i
    # Background is drawn more often: scenes have a large smooth surround.
    probs = np.array([2.0] + [1.0] * len(TEXTURES))
    seed_classes = rng.choice(REGION_CLASSES, size=num_seeds, p=probs / probs.sum())
    regions = np.asarray(seed_classes, np.uint8)[nearest]

    canvas = Image.fromarray(regions)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 4))):
        cy, cx = rng.uniform(0, 1, size=2) * np.array([h, w])
        ry, rx = rng.uniform(0.06, 0.2, size=2) * scale
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=int(rng.choice(REGION_CLASSES)))
    for _ in range(int(rng.integers(0, 3))):
        cy, cx = rng.uniform(0, 1, size=2) * np.array([h, w])
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 7))))
        radii = rng.uniform(0.05, 0.2, size=angles.size) * scale
        points = list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles), strict=True))
        draw.polygon(points, fill=int(rng.choice(REGION_CLASSES)))
    return np.asarray(canvas)


def _border_mask(label):
    """Pixels on either side of a class change (a band two pixels wide)."""
    mask = np.zeros(label.shape, bool)
    dy = label[1:, :] != label[:-1, :]
    dx = label[:, 1:] != label[:, :-1]
    mask[1:, :] |= dy
    mask[:-1, :] |= dy
    mask[:, 1:] |= dx
    mask[:, :-1] |= dx
    return mask


def _thin_structures(shape, rng):
    """Masks of polylines (class LINE) and small ellipses (class BLOB)."""
    h, w = shape
    area_scale = h * w / 384.0**2
    lines = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(lines)
    for _ in range(int(rng.integers(1, 4))):
        num_points = int(rng.integers(2, 5))
        points = [tuple(p) for p in rng.uniform(0, 1, size=(num_points, 2)) * np.array([w, h])]
        draw.line(points, fill=1, width=int(rng.integers(2, 5)), joint="curve")
    blobs = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(blobs)
    num_blobs = max(2, int(round(rng.integers(3, 12) * area_scale)))
    for _ in range(num_blobs):
        cy, cx = rng.uniform(0, 1, size=2) * np.array([h, w])
        ry, rx = rng.uniform(3, 7, size=2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    return np.asarray(lines, bool), np.asarray(blobs, bool)


def generate_sample(rng, size=(384, 384)):
    """Draw one image and its label map.

    Args:
        rng: a ``numpy.random.Generator``; the sample depends only on its state.
        size: ``(H, W)`` or a single int for a square image.

    Returns:
        ``(image, label)``: ``uint8`` arrays of shape ``(H, W, 3)`` (RGB) and ``(H, W)`` with
        values in ``0..len(CLASSES)`` (0 = ignore).
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    # Per-image jitter shared by every class: the class mean relationship is unchanged.
    base = rng.uniform(80, 175, size=3).astype(np.float32)
    amplitude = np.float32(rng.uniform(35, 55))
    tint = rng.uniform(0.75, 1.25, size=3).astype(np.float32)
    tint /= tint.mean()

    regions = _region_layout((h, w), rng)
    signal = np.zeros((h, w), np.float32)  # +-1 texture pattern, 0 where smooth
    present = np.flatnonzero(np.bincount(regions.ravel(), minlength=len(CLASSES) + 1))
    for cls in present:
        if cls in TEXTURES:
            y, x = np.nonzero(regions == cls)
            signal[y, x] = _texture(int(cls), y, x, rng, (h, w))
    gradient = np.where(regions == BACKGROUND, _smooth_field((h, w), rng), np.float32(0))
    gradient_tint = np.float32(30.0) * rng.uniform(0.6, 1.4, size=3).astype(np.float32)
    image = base + signal[..., None] * (amplitude * tint) + gradient[..., None] * gradient_tint

    label = regions.copy()
    label[_border_mask(regions)] = IGNORE

    lines, blobs = _thin_structures((h, w), rng)
    for mask, cls in ((lines, LINE), (blobs, BLOB)):
        # Random polarity per class and image: shape, not brightness, identifies them.
        offset = np.float32(rng.choice([-1.5, 1.5])) * amplitude * tint
        image[mask] = base + offset
        label[mask] = cls
    image += rng.integers(-3, 4, size=image.shape, dtype=np.int8)  # sensor noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def sample_rng(seed, split, index):
    """Generator for one sample, a function of ``(seed, split, index)`` alone."""
    return np.random.default_rng([int(seed), SPLITS[split][1], int(index)])


def sample_name(split, index):
    """ADE20K-style file stem, e.g. ``ADE_train_00000001``."""
    return f"ADE_{SPLITS[split][0]}_{index:08d}"


def _metadata(num_train, num_val, size, seed):
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return {
        "generator": "fatr_seg.datasets.synthetic",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "size": [h, w],
        "counts": {"training": int(num_train), "validation": int(num_val)},
        "classes": list(CLASSES),
        "palette": PALETTE,
    }


def is_complete(root, num_train=600, num_val=100, size=(384, 384), seed=0):
    """Whether ``root`` holds a finished dataset generated with exactly these settings."""
    root = Path(root)
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker != _metadata(num_train, num_val, size, seed):
        return False
    for split, count in marker["counts"].items():
        prefix = f"ADE_{SPLITS[split][0]}_"
        for folder, suffix in (("images", ".jpg"), ("annotations", ".png")):
            if len(list((root / folder / split).glob(f"{prefix}*{suffix}"))) != count:
                return False
    return True


def _progress(total, enabled):
    """A tqdm bar, or a minimal stand-in printing every 10% when tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _PrintProgress(total)
    return tqdm(total=total, desc="synthetic ADE20K", unit="img")


class _PrintProgress:
    def __init__(self, total):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def update(self, n=1):
        step = max(1, self.total // 10)
        for _ in range(n):
            self.done += 1
            if self.done % step == 0 or self.done == self.total:
                elapsed = time.perf_counter() - self.start
                print(f"synthetic ADE20K: {self.done}/{self.total} images ({elapsed:.1f}s)")

    def close(self):
        pass


def write_dataset(
    root, num_train=600, num_val=100, size=(384, 384), seed=0, progress=True, force=False
):
    """Write the dataset under ``root`` in ADE20K's layout, unless it is already there.

    Existing ``ADE_*`` files in the split folders are removed first, so a smaller regeneration
    leaves no stale samples. The marker file is written last.

    Args:
        root: dataset root (``data_root`` in mmseg configs).
        num_train: images in ``training``.
        num_val: images in ``validation``.
        size: ``(H, W)`` or a single int.
        seed: the dataset's seed; each image depends only on ``(seed, split, index)``.
        progress: show a progress bar.
        force: regenerate even if a matching marker is present.

    Returns:
        ``{"training": num_train, "validation": num_val}``.
    """
    root = Path(root)
    counts = {"training": int(num_train), "validation": int(num_val)}
    if not force and is_complete(root, num_train, num_val, size, seed):
        return counts

    (root / MARKER).unlink(missing_ok=True)
    for split in SPLITS:
        for folder, suffix in (("images", ".jpg"), ("annotations", ".png")):
            directory = root / folder / split
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob(f"ADE_{SPLITS[split][0]}_*{suffix}"):
                stale.unlink()

    bar = _progress(sum(counts.values()), progress)
    for split, count in counts.items():
        for index in range(1, count + 1):
            image, label = generate_sample(sample_rng(seed, split, index), size)
            name = sample_name(split, index)
            Image.fromarray(image).save(
                root / "images" / split / f"{name}.jpg", quality=JPEG_QUALITY, subsampling=0
            )
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    (root / MARKER).write_text(json.dumps(_metadata(num_train, num_val, size, seed), indent=2))
    return counts
