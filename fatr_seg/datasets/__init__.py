"""Data without mmseg: the synthetic ADE20K-layout set of the demo, and CamVid's metadata and
layout conversion (pure numpy and Pillow)."""

from .camvid import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CAMVID_SPLITS,
    CAMVID_VOID,
    check_camvid_labels,
    prepare_camvid,
)
from .synthetic import CLASSES, PALETTE, generate_sample, write_dataset

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "CAMVID_SPLITS",
    "CAMVID_VOID",
    "CLASSES",
    "PALETTE",
    "check_camvid_labels",
    "generate_sample",
    "prepare_camvid",
    "write_dataset",
]
