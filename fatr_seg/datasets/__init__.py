"""Synthetic ADE20K-layout data for the embedded default (pure numpy and Pillow)."""

from .synthetic import CLASSES, PALETTE, generate_sample, write_dataset

__all__ = ["CLASSES", "PALETTE", "generate_sample", "write_dataset"]
