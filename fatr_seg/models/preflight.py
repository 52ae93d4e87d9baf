"""Checks a config before a Runner is built, so that missing data or weights fail in one line."""

from __future__ import annotations

import os

from .convert import WEIGHTS_HELP

__all__ = ["PreflightError", "check_config", "check_config_paths", "check_model"]

DATA_HELP = "see README.md, section 'ADE20K'"


class PreflightError(RuntimeError):
    """A path the config needs does not exist, or the model parts do not fit together."""


# Decode heads that read ``CompactTokens`` (a backbone built with ``compact_output=True``).
COMPACT_HEADS = ("FATRSegmenterHead",)


def _dataset_dirs(dataset: dict) -> list[str]:
    if dataset is None:
        return []
    if "datasets" in dataset:  # ConcatDataset
        return [p for d in dataset["datasets"] for p in _dataset_dirs(d)]
    if "dataset" in dataset:  # RepeatDataset / MultiImageMixDataset
        return _dataset_dirs(dataset["dataset"])
    root = dataset.get("data_root", "") or ""
    prefixes = (dataset.get("data_prefix") or {}).values()
    dirs = [os.path.join(root, p) for p in prefixes if isinstance(p, str) and p]
    return dirs or ([root] if root else [])


def check_config_paths(cfg, train: bool = True) -> None:
    """Raise :class:`PreflightError` naming the first missing data directory or checkpoint.

    Args:
        cfg: An mmengine ``Config``.
        train: Also check the training data and the backbone's pretrained checkpoint.
    """
    loaders = ["val_dataloader", "test_dataloader"] + (["train_dataloader"] if train else [])
    for name in loaders:
        loader = cfg.get(name)
        if not loader:
            continue
        for path in _dataset_dirs(loader.get("dataset")):
            if not os.path.isdir(path):
                raise PreflightError(f"data directory not found: {path} ({name}; {DATA_HELP})")
    if train:
        init_cfg = (cfg.get("model", {}).get("backbone") or {}).get("init_cfg") or {}
        ckpt = init_cfg.get("checkpoint") if init_cfg.get("type") == "Pretrained" else None
        if ckpt and "://" not in ckpt and not os.path.isfile(ckpt):
            raise PreflightError(f"pretrained checkpoint not found: {ckpt} ({WEIGHTS_HELP})")


def check_model(cfg) -> None:
    """Raise :class:`PreflightError` if the backbone's output cannot feed the decode head."""
    model = cfg.get("model") or {}
    backbone = model.get("backbone") or {}
    if not backbone.get("compact_output"):
        return
    head = (model.get("decode_head") or {}).get("type")
    readers = []
    if head not in COMPACT_HEADS:
        readers.append(f"decode_head type {head!r}")
    if model.get("neck"):
        readers.append(f"neck {model['neck'].get('type')!r}")
    if model.get("auxiliary_head"):
        readers.append("auxiliary_head")
    if readers:
        raise PreflightError(
            f"model.backbone.compact_output=True returns reduced token sets, which only "
            f"{', '.join(COMPACT_HEADS)} reads, but this config also feeds them to "
            f"{' and '.join(readers)}: set model.backbone.compact_output=False (full-grid maps "
            "for any mmseg head) or use decode_head type 'FATRSegmenterHead' without neck"
        )


def check_config(cfg, train: bool = True) -> None:
    """All preflight checks: the model's parts fit together, and the paths exist."""
    check_model(cfg)
    check_config_paths(cfg, train)
