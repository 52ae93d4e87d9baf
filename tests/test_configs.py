"""Every config parses and builds; bad reduction keys fail at build time; preflight path checks."""

from pathlib import Path

import pytest
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
from tiny_configs import load_config

from fatr_seg.layers import REDUCTION_DEFAULTS, ReductionConfig
from fatr_seg.models import FATRViT, TimmFATRViT
from fatr_seg.models.preflight import PreflightError, check_config_paths

register_all_modules()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p for p in CONFIGS.rglob("*.py") if "_base_" not in p.parts)
MAIN_REDUCTION = dict(method="fatr_local", reduce_in_training=False)


def load(name):
    return load_config(CONFIGS / name)


def build(cfg):
    cfg.model.backbone.init_cfg = None  # pretrain/ need not exist for a build
    return MODELS.build(cfg.model)


def test_configs_are_found():
    names = {p.name for p in CONFIG_FILES}
    assert {"fatr_ade20k.py", "baseline_vit-s_ade20k.py"} <= names
    assert len(names) >= 6


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_and_builds(path):
    cfg = load(str(path.relative_to(CONFIGS)))
    assert "fatr_seg.models" in cfg.custom_imports["imports"]
    assert cfg.model.backbone.type in ("FATRViT", "TimmFATRViT")  # configs/timm: timm's models
    model = build(cfg)
    backbone = model.backbone
    assert isinstance(backbone, FATRViT | TimmFATRViT)
    assert backbone.reduction == ReductionConfig.from_dict(cfg.model.backbone.reduction)
    assert model.decode_head.num_classes == cfg.model.decode_head.num_classes
    for name in ("train_dataloader", "val_dataloader", "test_dataloader", "val_evaluator"):
        assert cfg.get(name), f"{path.name} lacks {name}"


def test_main_config_is_the_default_setting():
    cfg = load("fatr_ade20k.py")
    backbone = cfg.model.backbone
    assert backbone.reduction == MAIN_REDUCTION
    red = ReductionConfig.from_dict(backbone.reduction)
    # The 'fatr_local' preset, trained unreduced, nothing else.
    assert red == ReductionConfig.from_dict(dict(method="fatr_local", reduce_in_training=False))
    assert red == ReductionConfig.from_dict(REDUCTION_DEFAULTS)
    assert red.aggregate == ("merge",) * 3 and red.restore == "copy" and red.layers == (2, 5, 8)
    assert (backbone.embed_dims, backbone.num_layers, backbone.num_heads) == (384, 12, 6)
    assert backbone.patch_size == 16 and tuple(cfg.crop_size) == (512, 512)
    assert backbone.init_cfg == dict(type="Pretrained",
                                     checkpoint="pretrain/vit_small_patch16_384.pth")  # fmt: skip
    assert cfg.model.decode_head.type == "FATRSegmenterHead"
    assert backbone.compact_output is True
    assert cfg.model.test_cfg.mode == "slide"
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size


def test_baseline_is_the_main_model_without_reduction():
    fatr, base = load("fatr_ade20k.py"), load("baseline_vit-s_ade20k.py")
    assert base.model.backbone.reduction is None
    base.model.backbone.reduction = fatr.model.backbone.reduction
    assert base.model == fatr.model
    small = {"model.backbone.embed_dims": 48, "model.backbone.num_heads": 3,
             "model.decode_head.in_channels": 48, "model.decode_head.channels": 48,
             "model.decode_head.embed_dims": 48, "model.decode_head.num_heads": 3}  # fmt: skip
    fatr.merge_from_dict(small)
    base = load("baseline_vit-s_ade20k.py")
    base.merge_from_dict(small)
    fatr_keys, base_keys = set(build(fatr).state_dict()), set(build(base).state_dict())
    extra = fatr_keys - base_keys
    assert base_keys < fatr_keys
    assert extra and all(k.endswith(("omega1", "omega2", "dc_pos")) for k in extra)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(keep_ratio=1.5), r"reduction\.keep_ratio=.*1\.5.* \(0, 1\]"),
        (dict(foo=1), r"unknown key\(s\) \['foo'\]"),
        (dict(windows=(2, 3, 1)), r"reduction\.windows=\(2, 3, 1\)"),
        (dict(layers=(4, 7, 13)), r"reduction\.layers=\(4, 7, 13\).*12 blocks"),
        (dict(restore="nearest"), r"reduction\.restore='nearest'"),
        (dict(score="max"), r"reduction\.score=.*'max'"),
        (dict(method="fatr_paper", windows=(2, 1)), r"reduction\.windows=\(2, 1\)"),
        (dict(method="tomee"), r"reduction\.method='tomee'.*fatr_paper"),
    ],
)
def test_invalid_reduction_fails_at_build_naming_the_key(change, match):
    cfg = load("fatr_ade20k.py")
    cfg.merge_from_dict({f"model.backbone.reduction.{k}": v for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        build(cfg)


# ---------------------------------------------------------------------------------------------
# Preflight


def with_paths(tmp_path, make_data, make_ckpt):
    """The main config pointed at ``tmp_path`` (data root and checkpoint), optionally created."""
    cfg = load("fatr_ade20k.py")
    root = tmp_path / "ade" / "ADEChallengeData2016"
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = str(root)
    ckpt = tmp_path / "pretrain" / "vit_small_patch16_384.pth"
    cfg.model.backbone.init_cfg.checkpoint = str(ckpt)
    if make_data:
        for split in ("training", "validation"):
            for kind in ("images", "annotations"):
                (root / kind / split).mkdir(parents=True)
    if make_ckpt:
        ckpt.parent.mkdir()
        ckpt.write_bytes(b"")
    return cfg, root, ckpt


def test_preflight_missing_data_root_names_the_path(tmp_path):
    cfg, root, _ = with_paths(tmp_path, make_data=False, make_ckpt=True)
    for train in (True, False):
        with pytest.raises(PreflightError, match="data directory not found") as err:
            check_config_paths(cfg, train=train)
        message = str(err.value)
        assert str(root / "images" / "validation") in message
        assert "docs/usage.md" in message and "ADE20K" in message and "\n" not in message


def test_preflight_missing_checkpoint_names_the_path(tmp_path):
    cfg, _, ckpt = with_paths(tmp_path, make_data=True, make_ckpt=False)
    with pytest.raises(PreflightError, match="pretrained checkpoint not found") as err:
        check_config_paths(cfg, train=True)
    assert str(ckpt) in str(err.value) and "Pretrained weights" in str(err.value)
    check_config_paths(cfg, train=False)  # testing loads a full checkpoint instead


def test_preflight_passes_when_everything_exists(tmp_path):
    cfg, _, _ = with_paths(tmp_path, make_data=True, make_ckpt=True)
    check_config_paths(cfg, train=True)
    check_config_paths(cfg, train=False)
