"""``TimmFATRViT``: the registered backbone over timm, its checkpoints, configs and MACs.

Checkpoints are tiny random timm models written to disk (the real ViT-Ti/16 from the shared
folder where it is; those tests skip without it). The Segmenter configs for DINOv2 with
registers and EVA-02 train 2 iterations and test through ``tools/train.py`` and
``tools/test.py`` on a small synthetic ADE20K-layout set, shrunk to 2 blocks of width 48.
"""

import json

import pytest
import timm
import torch
from camvid_data import REAL_VIT_TI, REPO, SHARED_HINT, fatr_vit, load_real_vit_ti
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
from safetensors.torch import load_file, save_file
from seg_batch import seg_batch
from test_checkpoint_sources import server  # noqa: F401 (a fixture: files served over http)
from tiny_configs import SMALL_DATA, run_tool
from torch.testing import assert_close

from fatr_seg.analysis.flops import count_macs
from fatr_seg.layers import ReductionConfig
from fatr_seg.models import CheckpointError, TimmFATRViT
from fatr_seg.models.keep_ratio import set_config_keep_ratio

register_all_modules()
pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = REPO / "configs" / "timm"
TINY = dict(depth=2, embed_dim=48, num_heads=3)
NO_VIT = f"real ViT-Ti weights not found at {REAL_VIT_TI} ({SHARED_HINT})"


def timm_model(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def build(**cfg):
    backbone = MODELS.build(dict(type="TimmFATRViT", **cfg))
    backbone.init_weights()
    return backbone.eval()


def images(size=(56, 56), seed=0):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def patch_tokens(grid):
    return grid.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Checkpoints in timm's layout, through mmengine's loader and timm's own filter
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("suffix", [".safetensors", ".pth", "segmentor.pth"])
@pytest.mark.parametrize(
    "name,kwargs",
    [("vit_small_patch14_reg4_dinov2", dict(TINY, img_size=56)),
     ("eva02_small_patch14_224", dict(TINY, img_size=56))],
)  # fmt: skip
def test_checkpoint_loads_to_timms_features(tmp_path, name, kwargs, suffix):
    model = timm_model(name, **kwargs)
    path = str(tmp_path / f"model{suffix}")
    if suffix == ".safetensors":  # a flat tensor dict, as the hub stores it
        save_file(model.state_dict(), path)
    elif suffix == ".pth":  # timm's state_dict, classifier included
        torch.save(model.state_dict(), path)
    else:  # a Segmenter checkpoint: the backbone under backbone.*
        state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
        torch.save({"state_dict": {**state, "decode_head.x": torch.zeros(1)}}, path)
    ours = build(model_name=name, model_kwargs=kwargs, init_cfg=dict(type="Pretrained",
                                                                     checkpoint=path))  # fmt: skip
    x = images()
    expected = model.forward_features(x)[:, model.num_prefix_tokens :]
    assert_close(patch_tokens(ours(x)[0]), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("filename", ["model.safetensors", "eva02.pth"])
def test_checkpoint_url_loads_through_mmengine(server, filename):  # noqa: F811
    """A URL (the hub's file name, or a .pth that mmengine's CheckpointLoader reads)."""
    root, url = server
    name, kwargs = "eva02_small_patch14_224", dict(TINY, img_size=56)
    model = timm_model(name, **kwargs)
    if filename.endswith(".safetensors"):
        save_file(model.state_dict(), str(root / filename))
    else:
        torch.save({"state_dict": model.state_dict()}, root / filename)
    ours = build(model_name=name, model_kwargs=kwargs, checkpoint=f"{url}/{filename}")
    x = images()
    assert_close(patch_tokens(ours(x)[0]), model.forward_features(x)[:, 1:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_checkpoint_of_another_size_is_resampled_as_timm_does(tmp_path):
    """A 56x56 checkpoint in a 70x84 model: timm's filter resamples the positional embedding,
    as timm's own loading does."""
    name = "vit_small_patch14_reg4_dinov2"
    src = timm_model(name, **TINY, img_size=56)
    save_file(src.state_dict(), str(tmp_path / "m.safetensors"))
    ref = timm.create_model(name, pretrained=False, **TINY, img_size=(70, 84)).eval()
    module = __import__("timm.models.vision_transformer", fromlist=["checkpoint_filter_fn"])
    ref.load_state_dict(module.checkpoint_filter_fn(src.state_dict(), ref))
    ours = build(model_name=name, model_kwargs=dict(TINY, img_size=(70, 84)),
                 checkpoint=str(tmp_path / "m.safetensors"))  # fmt: skip
    assert ours.pos_embed.shape == ref.pos_embed.shape == (1, 30, 48)
    x = images((70, 84))
    assert_close(patch_tokens(ours(x)[0]), ref.forward_features(x)[:, 5:], rtol=1e-5, atol=1e-5)


def test_checkpoint_of_another_model_names_the_first_mismatched_keys(tmp_path):
    path = tmp_path / "vit_small.safetensors"
    save_file(timm_model("vit_small_patch16_224", depth=2).state_dict(), str(path))
    with pytest.raises(CheckpointError) as err:
        build(model_name="vit_tiny_patch16_224", model_kwargs=dict(depth=2), checkpoint=str(path))
    message = str(err.value)
    assert f"{path} does not match timm model 'vit_tiny_patch16_224'" in message
    # the first keys that differ, in the file's order (safetensors sorts them)
    assert "shape mismatch ['blocks.0.attn.proj.bias: checkpoint (384,) vs model (192,)'" in message
    # An EVA-02 checkpoint (SwiGLU MLP) in a DINOv2 ViT.
    path = tmp_path / "eva.safetensors"
    save_file(timm_model("eva02_small_patch14_224", **TINY).state_dict(), str(path))
    with pytest.raises(CheckpointError, match=r"shape mismatch \['blocks.0.mlp.fc1.bias: "
                       r"checkpoint \(256,\) vs model \(192,\)'"):  # fmt: skip
        build(model_name="vit_small_patch14_dinov2", model_kwargs=dict(TINY, img_size=224),
              checkpoint=str(path))  # fmt: skip


def test_missing_checkpoint_and_bad_arguments_fail_naming_them(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {tmp_path}/none.pth"):
        build(model_name="vit_tiny_patch16_224", model_kwargs=dict(depth=2),
              checkpoint=str(tmp_path / "none.pth"))  # fmt: skip
    with pytest.raises(ValueError, match="two checkpoints given"):
        build(model_name="vit_tiny_patch16_224", checkpoint="a.pth", pretrained="b.pth")
    with pytest.raises(ValueError, match="drop_path_rate=0.1 and model_kwargs drop_path_rate=0.2"):
        build(model_name="vit_tiny_patch16_224", drop_path_rate=0.1,
              model_kwargs=dict(depth=2, drop_path_rate=0.2))  # fmt: skip
    with pytest.raises(ValueError, match="'vit_small_r26_s32_224' is not supported.*CNN stem"):
        build(model_name="vit_small_r26_s32_224")


@pytest.mark.skipif(not REAL_VIT_TI.is_file(), reason=NO_VIT)
@torch.no_grad()
def test_real_vit_ti_loads_strictly_and_gives_timms_features():
    ours = build(model_name="vit_tiny_patch16_224", checkpoint=str(REAL_VIT_TI))
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    ref.load_state_dict({k: v for k, v in load_file(str(REAL_VIT_TI)).items()
                         if not k.startswith("head.")})  # fmt: skip
    x = images((224, 224))
    assert_close(patch_tokens(ours(x)[0]), ref.forward_features(x)[:, 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not REAL_VIT_TI.is_file(), reason=NO_VIT)
@torch.no_grad()
@pytest.mark.parametrize("method", ["fatr", "fatr_paper"])
def test_real_vit_ti_without_antialias_is_fatrvit_at_camvids_sizes(method):
    """Both backbones load the file themselves for CamVid's 352x352 crop (14x14 -> 22x22) and
    run a 360x480 image (23x30 tokens): with antialias=False the timm path resamples as
    FATRViT does, so it keeps the same tokens and gives the same features."""
    red = dict(method=method)
    ckpt = str(REAL_VIT_TI)
    fatr = fatr_vit(ckpt, red, img_size=352)
    ours = build(model_name="vit_tiny_patch16_224", model_kwargs=dict(img_size=352),
                 antialias=False, reduction=red, checkpoint=ckpt)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.randn(1, 3, 23, 30, generator=gen), (360, 480),
                                        mode="bilinear")  # fmt: skip
    for a, b in zip(ours.reduction_trace(x), fatr.reduction_trace(x), strict=True):
        assert torch.equal(a.kept, b.kept)
    assert_close(ours(x)[0], fatr(x)[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
CONFIG_FILES = sorted(CONFIGS.glob("*.py"))
MODEL_NAMES = {
    "dinov2": "vit_small_patch14_reg4_dinov2",
    "eva02": "eva02_small_patch14_224",
    "timm-vit-t": "vit_tiny_patch16_224",
}


def load(path) -> Config:
    return Config.fromfile(str(path))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_timm_configs_build(path):
    cfg = load(path)
    backbone = cfg.model.backbone
    assert backbone.type == "TimmFATRViT"
    assert backbone.model_name == next(v for k, v in MODEL_NAMES.items() if k in path.name)
    fatr = path.name.startswith("fatr_")
    assert (backbone.reduction is not None) == fatr and backbone.compact_output == fatr
    if "distill" not in path.name:
        assert backbone.init_cfg.type == "Pretrained"
        assert backbone.init_cfg.checkpoint.startswith("pretrain/")  # a path, never a URL
    cfg.model.backbone.init_cfg = None
    if "distill" in path.name:  # the student's backbone (the teacher needs a checkpoint)
        backbone = MODELS.build(cfg.model.backbone)
    else:
        backbone = MODELS.build(cfg.model).backbone
    assert isinstance(backbone, TimmFATRViT)
    crop = tuple(cfg.crop_size)
    prefix = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
    grid = (crop[0] // backbone.patch_size, crop[1] // backbone.patch_size)
    assert backbone.pos_embed.shape[1] == grid[0] * grid[1] + prefix
    if fatr:  # --keep-ratio sets these configs' budget as FATRViT's
        layers = ReductionConfig.from_dict(cfg.model.backbone.reduction).layers
        assert set_config_keep_ratio(load(path), "0.5", path.name) == (0.5,) * len(layers)


def test_camvid_timm_configs_mirror_the_fatrvit_ones():
    ours = load(CONFIGS / "fatr_timm-vit-t_camvid.py")
    theirs = load(REPO / "configs" / "camvid" / "fatr-late_vit-t_camvid.py")  # the same schedule
    assert ours.model.backbone.reduction == theirs.model.backbone.reduction
    assert ours.model.backbone.init_cfg == theirs.model.backbone.init_cfg
    ours.model.pop("backbone"), theirs.model.pop("backbone")
    assert ours.model == theirs.model
    assert (
        ours.train_dataloader == theirs.train_dataloader
        and ours.optim_wrapper == theirs.optim_wrapper
    )
    distill = load(CONFIGS / "fatr_timm-vit-t_camvid_distill.py")
    assert distill.model.type == "DistillEncoderDecoder"
    assert distill.model.backbone.model_kwargs.get("drop_path_rate", 0.0) == 0.0
    assert distill.model.backbone.drop_path_rate == 0.0


@pytest.mark.skipif(not REAL_VIT_TI.is_file(), reason=NO_VIT)
def test_camvid_timm_config_loads_the_real_file_strictly():
    ours, file = load_real_vit_ti(load(CONFIGS / "fatr_timm-vit-t_camvid.py"))
    assert ours["pos_embed"].shape == (1, 1 + 22 * 22, 192)  # resized by timm's filter
    file.pop("pos_embed")
    assert_close({k: ours[k] for k in file}, file, rtol=0, atol=0)
    assert all(
        k.endswith(("omega1", "omega2", "dc_pos")) for k in set(ours) - set(file) - {"pos_embed"}
    )


@torch.no_grad()
def test_a_fatrvit_checkpoint_loads_into_the_timm_config_and_back(tmp_path):
    """ViT-Ti: TimmFATRViT's keys are FATRViT's, so the unreduced CamVid model trained either
    way is the teacher of either distillation config."""
    shrink = {"model.backbone.model_kwargs.depth": 2}
    timm_cfg = load(CONFIGS / "segmenter_timm-vit-t_camvid.py")
    timm_cfg.merge_from_dict(shrink)
    fatr_cfg = load(REPO / "configs" / "camvid" / "segmenter_vit-t_camvid.py")
    fatr_cfg.merge_from_dict({"model.backbone.num_layers": 2})
    for cfg in (timm_cfg, fatr_cfg):
        cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    fatr_model = MODELS.build(fatr_cfg.model).eval()
    timm_model_ = MODELS.build(timm_cfg.model).eval()
    timm_model_.load_state_dict(fatr_model.state_dict(), strict=True)
    x = images((352, 352))
    assert_close(timm_model_.backbone(x)[0], fatr_model.backbone(x)[0], rtol=1e-5, atol=1e-5)


def test_the_timm_distillation_config_distils_from_a_fatrvit_baseline(tmp_path):
    """configs/timm/fatr_timm-vit-t_camvid_distill.py (shrunk to width 48) takes the trained
    unreduced FATRViT CamVid segmentor as teacher and start: it loads strictly into both, and
    one training step of the recipe runs."""
    width = {"model.decode_head.in_channels": 48, "model.decode_head.channels": 48,
             "model.decode_head.embed_dims": 48, "model.decode_head.num_heads": 3,
             "model.decode_head.num_layers": 1}  # fmt: skip
    base = load(REPO / "configs" / "camvid" / "segmenter_vit-t_camvid.py")
    backbone = {"model.backbone.embed_dims": 48, "model.backbone.num_heads": 3,
                "model.backbone.init_cfg": None}  # fmt: skip
    base.merge_from_dict({**width, **backbone})
    torch.manual_seed(0)
    teacher = MODELS.build(base.model)
    ckpt = tmp_path / "segmenter_vit-t_camvid.pth"
    torch.save({"state_dict": teacher.state_dict()}, ckpt)
    cfg = load(CONFIGS / "fatr_timm-vit-t_camvid_distill.py")
    cfg.merge_from_dict({**width, "model.teacher_checkpoint": str(ckpt),
                         "model.backbone.model_kwargs": dict(img_size=(352, 352), embed_dim=48,
                                                             num_heads=3)})  # fmt: skip
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert isinstance(model.backbone, TimmFATRViT) and model.backbone.reduction is not None
    for key, value in teacher.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
        assert torch.equal(model.teacher.backbone.state_dict()[key], value), key
    optim = build_optim_wrapper(model.train(), cfg.optim_wrapper)
    log = model.train_step(seg_batch((64, 64), 11), optim)
    assert torch.isfinite(log["loss"]) and "loss_distill" in log


# ---------------------------------------------------------------------------------------------
# Train and test end to end (tools/train.py, tools/test.py), and MACs reduced vs unreduced
# ---------------------------------------------------------------------------------------------
SMALL = """
_base_ = [{base!r}]
{data}model = dict(
    data_preprocessor=dict(size=crop_size),
    # 12 blocks of width 48: the config's own reduction (whatever its preset's layers).
    backbone=dict(model_kwargs=dict(img_size=(112, 112), depth=12, embed_dim=48, num_heads=3),
                  init_cfg=dict(type='Pretrained', checkpoint={checkpoint!r})),
    decode_head=dict(in_channels=48, channels=48, num_heads=3, embed_dims=48, num_layers=1),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(42, 42)))
"""
FAMILY_CONFIGS = {
    "dinov2": ("fatr_dinov2-s-reg4_mask_8xb1-160k_ade20k-518x518.py",
               "vit_small_patch14_reg4_dinov2"),
    "eva02": ("fatr_eva02-s_mask_8xb1-160k_ade20k-518x518.py", "eva02_small_patch14_224"),
}  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from fatr_seg.datasets import write_dataset

    root = tmp_path_factory.mktemp("timm") / "data"
    write_dataset(root, num_train=4, num_val=2, size=64, seed=0, progress=False)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_segmenter_config_trains_and_tests(tmp_path, data_root, family):
    name, model_name = FAMILY_CONFIGS[family]
    # The weights "from a path the user gives": a tiny random timm model of the family, at
    # another size (its positional embedding is resampled by timm's filter at load).
    ckpt = tmp_path / f"{model_name}.safetensors"
    save_file(timm_model(model_name, **dict(TINY, depth=12), img_size=56).state_dict(), str(ckpt))
    config = tmp_path / "small.py"
    data = SMALL_DATA.format(crop=56, batch=2, root=str(data_root))
    config.write_text(SMALL.format(base=str(CONFIGS / name), data=data, checkpoint=str(ckpt)))
    work = tmp_path / "work"
    train = run_tool(["tools/train.py", config, "--work-dir", work])
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert f"loaded {model_name} weights from {ckpt}" in train.stdout + train.stderr
    records = [json.loads(line) for path in work.glob("*/vis_data/scalars.json")
               for line in path.read_text().splitlines() if line.strip()]  # fmt: skip
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(0.0 < v < 100.0 for v in losses)
    assert any("mIoU" in r for r in records)
    test = run_tool(["tools/test.py", config, work / "iter_2.pth", "--work-dir", tmp_path / "t",
                     "--keep-ratio", "0.5"])  # fmt: skip
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    assert "mIoU" in test.stdout + test.stderr


@torch.no_grad()
@pytest.mark.parametrize("family", ["timm-vit-t", "dinov2", "eva02"])
def test_reduction_lowers_the_backbones_macs(family):
    """Each family, tiny (12 blocks of width 48) at 112²: the default reduction costs fewer
    MACs than none, its scoring included (the configs' own counts: results/timm_macs.json)."""
    name = MODEL_NAMES[family]
    kwargs = dict(TINY, depth=12, img_size=112)
    x = images((112, 112))[:1]
    plain = count_macs(build(model_name=name, model_kwargs=kwargs), x)
    reduced = count_macs(build(model_name=name, model_kwargs=kwargs, reduction={}), x)
    assert reduced.scoring_macs > 0
    assert reduced.macs < plain.macs
    assert plain.scoring_macs == 0


def test_segmentor_train_step_reaches_the_reductions_own_parameters():
    cfg = load(CONFIGS / "fatr_eva02-s_mask_8xb1-160k_ade20k-518x518.py")
    cfg.merge_from_dict({"model.backbone.model_kwargs": dict(TINY, depth=12, img_size=56),
                                              "model.backbone.init_cfg": None,
                         "model.data_preprocessor.size": (56, 56),
                         "model.decode_head.in_channels": 48, "model.decode_head.channels": 48,
                         "model.decode_head.embed_dims": 48, "model.decode_head.num_heads": 3,
                         "model.decode_head.num_layers": 1})  # fmt: skip
    model = MODELS.build(cfg.model).train()
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    omega = model.backbone.blocks[-1].attn.omega1
    before = omega.detach().clone()
    log = model.train_step(seg_batch((56, 56), 150), optim)
    assert torch.isfinite(log["loss"])
    assert not torch.equal(omega, before)  # the reweighting after the first reduction layer
