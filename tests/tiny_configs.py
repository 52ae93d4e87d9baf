"""Config text shared by the tests that run a tiny segmentor through tools/ or mmengine's Runner.

Pieces of mmengine config files (Python source), for templates based on
``configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py``;
they use the template's ``crop_size``. Also how those tests run
a tool: :func:`loader_options` and :func:`run_tool`.
"""

import copy
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


_PARSED: dict = {}


def load_config(path):
    """A fresh copy of a parsed config; parsing resolves mmseg's bases (slow), so each file is
    parsed once for all the tests."""
    from mmengine.config import Config

    if str(path) not in _PARSED:
        _PARSED[str(path)] = Config.fromfile(str(path))
    return copy.deepcopy(_PARSED[str(path)])


def loader_options(data_root) -> list[str]:
    """``--cfg-options`` that point every data loader at ``data_root``, without workers."""
    opts = []
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        opts += [f"{loader}.dataset.data_root={data_root}", f"{loader}.num_workers=0"]
    return opts


def run_tool(args, cwd=REPO) -> subprocess.CompletedProcess:
    """``python ARGS...`` in the repository, as a user runs a tool; output captured."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def run_tool_here(monkeypatch, args) -> SystemExit | None:
    """``python ARGS...`` in this process (torch and mmseg are imported already): the tool's
    ``main`` with ``sys.argv`` set; returns the ``SystemExit`` it raised (its one-line message),
    or None. For the tools' error exits: each tool's command line runs in a subprocess too."""
    import importlib.util

    path = REPO / str(args[0])
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(path), *map(str, args[1:])])
    try:
        module.main()
    except SystemExit as exit_:
        return exit_
    return None


def write_tiny(tmp, text: str):
    """The synthetic data (8 + 4 images of 64²) and the config ``text`` as ``tiny_fatr.py``
    under ``tmp``; returns ``(data_root, config_path, unreduced)``, the last the config with
    its backbone unreduced, full-grid and without weights (a teacher's or a checkpoint's)."""
    from mmengine.config import Config

    from fatr_seg.datasets import write_dataset

    data = tmp / "data"
    write_dataset(data, num_train=8, num_val=4, size=64, seed=0, progress=False)
    config = tmp / "tiny_fatr.py"
    config.write_text(text)
    cfg = Config.fromfile(str(config))
    cfg.model.backbone.update(reduction=None, compact_output=False, init_cfg=None)
    return data, config, cfg


def tiny_overrides(embed: int, heads: int, depth: int, patch: int, num_classes: int) -> dict:
    """``--cfg-options``-style overrides that shrink a main config's Segmenter to a toy of the
    same structure, on 64x64 crops."""
    return {
        "model.backbone.img_size": (64, 64),
        "model.backbone.patch_size": patch,
        "model.backbone.embed_dims": embed,
        "model.backbone.num_layers": depth,
        "model.backbone.num_heads": heads,
        **{f"model.decode_head.{k}": embed for k in ("in_channels", "channels", "embed_dims")},
        "model.decode_head.num_heads": heads,
        "model.decode_head.num_layers": 1,
        "model.decode_head.num_classes": num_classes,
        "model.data_preprocessor.size": (64, 64),
    }


# Training only: no validation or test loop.
NO_EVAL = """val_dataloader = None
val_evaluator = None
val_cfg = None
test_dataloader = None
test_evaluator = None
test_cfg = None
"""

# A 4-block ViT with FATR at blocks 2 and 3 and the Segmenter head on the compact output.
TINY_MODEL = """model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        img_size=crop_size, embed_dims=32, num_layers=4, num_heads=2, drop_path_rate=0.0,
        reduction=dict(_delete_=True, method='fatr', layers=(2, 3), aggregate='dc',
                       windows=(2, 1)), compact_output=True),
    # The main configs' head (Segmenter mask transformer on the reduced tokens), not the demo's
    # linear decoder, so training, testing and resuming cover the compact path.
    decode_head=dict(
        _delete_=True, type='FATRSegmenterHead', in_channels=32, channels=32, num_heads=2,
        embed_dims=32, num_layers=1, num_classes=9, dropout_ratio=0.0,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
"""

# The ADE20K-layout pipelines at ``crop_size`` (random crops, whole images in test), and the
# loaders on ``root`` without workers, two iterations: a ``str.format`` template.
SMALL_DATA = """crop_size = ({crop}, {crop})
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size={batch}, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root={root!r}, pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False,
                      dataset=dict(data_root={root!r}, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=2)
default_hooks = dict(checkpoint=dict(interval=2), logger=dict(interval=1))
"""
