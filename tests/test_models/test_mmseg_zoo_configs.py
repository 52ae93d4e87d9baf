"""mmseg's own Segmenter configs run with ``type='FATRViT'`` swapped into the backbone.

Each zoo config is loaded as mmseg ships it, the backbone's type swapped (plus
``custom_imports`` and a reduction), and only the crop shrunk to 64² (16 tokens; the stored
positional grid stays 32², so it is interpolated as at any other size). The model builds from
every backbone argument of the config, has exactly mmseg's parameters plus the reduction's own,
and trains one step through mmengine's optimizer wrapper. With ``reduction=None`` it computes
mmseg's features from mmseg's weights.
"""

import os

import mmseg
import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.utils import import_modules_from_strings
from mmseg.registry import MODELS
from seg_batch import seg_batch
from torch.testing import assert_close

from fatr_seg.models import FATRViT
from fatr_seg.models.convert import mmseg_name, mmseg_vit_to_fatr

ZOO = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", "segmenter")
REPO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                           "fatr_segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py")  # fmt: skip
CONFIGS = [
    "segmenter_vit-t_mask_8xb1-160k_ade20k-512x512.py",
    "segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py",
    "segmenter_vit-s_fcn_8xb1-160k_ade20k-512x512.py",
    pytest.param("segmenter_vit-b_mask_8xb1-160k_ade20k-512x512.py", marks=pytest.mark.slow),
]
CROP = (64, 64)
_FATR_ONLY = ("omega1", "omega2", "dc_pos")


def swapped(name, reduction=None):
    """The zoo config ``name`` with FATRViT in its backbone and a 64² crop."""
    cfg = Config.fromfile(os.path.join(ZOO, name))
    cfg.custom_imports = dict(imports=["fatr_seg.models"], allow_failed_imports=False)
    cfg.model.backbone.type = "FATRViT"
    cfg.model.backbone.reduction = reduction
    return shrink(cfg)


def shrink(cfg):
    cfg.model.data_preprocessor.size = CROP
    return cfg


def build(cfg):
    import_modules_from_strings(**cfg.custom_imports)
    return MODELS.build(cfg.model)


@pytest.mark.parametrize("name", CONFIGS)
def test_zoo_config_with_fatrvit_builds_and_trains(name):
    cfg = swapped(name, reduction=dict(method="fatr"))
    torch.manual_seed(0)
    model = build(cfg)
    backbone = model.backbone
    assert isinstance(backbone, FATRViT) and backbone.reduction.method == "fatr"
    # mmseg's segmentor-level ``pretrained`` URL became the backbone's init_cfg.
    assert backbone.init_cfg == dict(type="Pretrained", checkpoint=cfg.model.pretrained)
    assert cfg.model.pretrained.startswith("https://download.openmmlab.com/")

    # Exactly mmseg's parameters (shapes too), plus the reduction's own.
    stock = Config.fromfile(os.path.join(ZOO, name)).model.backbone
    ref = {k: v.shape for k, v in MODELS.build(stock).state_dict().items()}
    ours = {mmseg_name(k): v.shape for k, v in backbone.state_dict().items()
            if not k.endswith(_FATR_ONLY)}  # fmt: skip
    assert ours == ref

    model.train()
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = model.train_step(seg_batch(CROP, cfg.model.decode_head.num_classes), optim)
    assert torch.isfinite(log["loss"]) and log["loss"] > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "backbone.blocks.0.attn.qkv.weight" in changed
    assert "backbone.blocks.11.attn.omega1" in changed  # FATR's reweighting trains too


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "vit/vit_vit-b16-ln_mln_upernet_8xb2-160k_ade20k-512x512.py",  # 4 maps + neck, final norm
        "dpt/dpt_vit-b16_8xb2-160k_ade20k-512x512.py",  # [map, cls_token] per output
    ],
)
def test_other_vit_zoo_configs_with_fatrvit_train(name):
    """UPerNet (MultiLevelNeck) and DPT (output_cls_token=True) ViT-B configs, SyncBN as BN."""
    root = os.path.dirname(ZOO)
    cfg = Config.fromfile(os.path.join(root, name))
    stock = MODELS.build(cfg.model.backbone)
    cfg.model.backbone.type = "FATRViT"
    cfg.model.backbone.reduction = dict(method="fatr")
    cfg.custom_imports = dict(imports=["fatr_seg.models"], allow_failed_imports=False)
    model = revert_sync_batchnorm(build(shrink(cfg)))
    ours = {mmseg_name(k): v.shape for k, v in model.backbone.state_dict().items()
            if not k.endswith(_FATR_ONLY)}  # fmt: skip
    assert ours == {k: v.shape for k, v in stock.state_dict().items()}
    model.train()
    log = model.train_step(seg_batch(CROP, 150), build_optim_wrapper(model, cfg.optim_wrapper))
    assert torch.isfinite(log["loss"])


@torch.no_grad()
@pytest.mark.parametrize("name", CONFIGS[:3])
def test_zoo_backbone_without_reduction_is_mmseg_vit(name):
    cfg = swapped(name)
    torch.manual_seed(0)
    ref = MODELS.build(Config.fromfile(os.path.join(ZOO, name)).model.backbone)
    for p in ref.parameters():
        p.add_(0.05 * torch.randn_like(p))
    ours = build(cfg).backbone
    state = mmseg_vit_to_fatr(ref.state_dict())
    state.pop("patch_embed.proj.bias")  # the zero bias the converter adds; patch_bias=False
    ours.load_state_dict(state, strict=True)
    ref.eval()
    ours.eval()
    x = torch.randn(2, 3, *CROP)
    (expected,), (got,) = ref(x), ours(x)
    assert_close(got, expected, atol=2e-5, rtol=2e-5)


def without_scope(value):
    """A config as plain data, less the ``_scope_`` keys that ``mmseg::`` inheritance adds."""
    if isinstance(value, dict):
        return {k: without_scope(v) for k, v in value.items() if k != "_scope_"}
    if isinstance(value, list | tuple):
        return type(value)(without_scope(v) for v in value)
    return value


def test_repo_config_is_the_zoo_config_swapped():
    """configs/fatr_segmenter_vit-s_mask_...py is the README's swap, nothing else."""
    ours = Config.fromfile(REPO_CONFIG)
    expected = Config.fromfile(os.path.join(ZOO, CONFIGS[1]))
    swap = dict(type="FATRViT", reduction=dict(method="fatr_local", reduce_in_training=False))
    expected.merge_from_dict(dict(model=dict(backbone=swap)))
    got = without_scope(ours.to_dict())
    assert got.pop("custom_imports") == dict(imports=["fatr_seg.models"],
                                             allow_failed_imports=False)  # fmt: skip
    assert got == without_scope(expected.to_dict())
    # ... and trains like the swapped zoo config.
    model = build(shrink(ours)).train()
    log = model.train_step(seg_batch(CROP, 150), build_optim_wrapper(model, ours.optim_wrapper))
    assert torch.isfinite(log["loss"])
