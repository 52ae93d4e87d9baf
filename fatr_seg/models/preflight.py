"""Checks a config before a Runner is built, so that missing data or weights fail in one line."""

from __future__ import annotations

import os

from .convert import WEIGHTS_HELP, is_remote

__all__ = ["PreflightError", "check_config", "check_config_paths", "check_model"]

# docs/usage.md's section on getting each dataset, by dataset type; other types point to ADE20K's.
DATA_SECTIONS = {"CamVidDataset": "CamVid"}


class PreflightError(RuntimeError):
    """A path the config needs does not exist, or the model parts do not fit together."""


# Decode heads that read ``CompactTokens`` (a backbone built with ``compact_output=True``).
COMPACT_HEADS = ("FATRSegmenterHead",)


def data_help(dataset_type) -> str:
    """Where docs/usage.md says how to get the data of ``dataset_type``."""
    name = dataset_type if isinstance(dataset_type, str) else getattr(dataset_type, "__name__", "")
    return f"see docs/usage.md, section '{DATA_SECTIONS.get(name, 'ADE20K')}'"


def _dataset_dirs(dataset: dict) -> list[tuple[str, str]]:
    """``(directory, docs hint)`` for each folder a dataset config reads."""
    if dataset is None:
        return []
    if "datasets" in dataset:  # ConcatDataset
        return [p for d in dataset["datasets"] for p in _dataset_dirs(d)]
    if "dataset" in dataset:  # RepeatDataset / MultiImageMixDataset
        return _dataset_dirs(dataset["dataset"])
    root = dataset.get("data_root", "") or ""
    prefixes = (dataset.get("data_prefix") or {}).values()
    dirs = [os.path.join(root, p) for p in prefixes if isinstance(p, str) and p]
    return [(d, data_help(dataset.get("type"))) for d in dirs or ([root] if root else [])]


def check_config_paths(cfg, train: bool = True) -> None:
    """Raise :class:`PreflightError` naming the first missing data directory or checkpoint.

    Args:
        cfg: An mmengine ``Config``.
        train: Check what training reads (training and validation data, the backbone's
            pretrained checkpoint, a distillation teacher; local paths only, URLs and
            model-zoo prefixes are left to the loader); else what testing reads (the test data).
    """
    # A Runner builds a loader only when its loop runs: training never reads the test data.
    loaders = ["val_dataloader", "train_dataloader"] if train else ["test_dataloader"]
    for name in loaders:
        loader = cfg.get(name)
        if not loader or (name == "val_dataloader" and not cfg.get("val_cfg")):
            continue
        for path, hint in _dataset_dirs(loader.get("dataset")):
            if not os.path.isdir(path):
                raise PreflightError(f"data directory not found: {path} ({name}; {hint})")
    if train:
        for ckpt in _pretrained_checkpoints(cfg.get("model") or {}):
            if not is_remote(ckpt) and not os.path.isfile(ckpt):
                raise PreflightError(f"pretrained checkpoint not found: {ckpt} ({WEIGHTS_HELP})")
        # DistillEncoderDecoder: the trained unreduced segmentor it distils from.
        teacher = cfg.get("model", {}).get("teacher_checkpoint")
        if teacher and not os.path.isfile(teacher):
            raise PreflightError(
                f"teacher checkpoint not found: {teacher} "
                f"(model.teacher_checkpoint; {DISTILL_HELP})"
            )


# Where a distillation teacher comes from (``DistillEncoderDecoder``'s ``teacher_checkpoint``).
DISTILL_HELP = "see README.md, section 'Fine-tune a trained Segmenter into FATR'"


def _pretrained_checkpoints(model: dict) -> list[str]:
    """Checkpoints the backbone loads: its ``init_cfg`` and mmseg's ``pretrained`` keys.

    mmseg's zoo configs set ``model.pretrained``; the segmentor hands it to the backbone.
    """
    backbone = model.get("backbone") or {}
    init_cfgs = backbone.get("init_cfg") or []
    init_cfgs = init_cfgs if isinstance(init_cfgs, list | tuple) else [init_cfgs]
    paths = [c.get("checkpoint") for c in init_cfgs
             if c.get("type") in ("Pretrained", "Pretrained_Part")]  # fmt: skip
    paths += [model.get("pretrained"), backbone.get("pretrained")]
    return [p for p in paths if isinstance(p, str) and p]


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
