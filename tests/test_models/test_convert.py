"""Checkpoint conversion and loading: timm ViT and mmseg VisionTransformer/Segmenter -> FATRViT.

Each test saves a checkpoint of a *different* implementation (timm or mmseg, random weights),
converts it with ``tools/convert_weights.py``, loads it through the backbone's
``init_cfg=dict(type='Pretrained', ...)`` strictly and compares the feature maps.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from mmengine.config import ConfigDict
from mmengine.runner import load_checkpoint
from mmseg.models.backbones import VisionTransformer as MMSegViT
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT
from tiny_segmentors import randomize_ as randomize_weights
from torch.testing import assert_close

from fatr_seg.models import CheckpointError, FATRViT
from fatr_seg.models.convert import convert_state_dict, detect_format, resize_pos_embed

register_all_modules()
REPO_ROOT = Path(__file__).resolve().parents[2]
TOOL = REPO_ROOT / "tools" / "convert_weights.py"
EMBED, HEADS, DEPTH, PATCH, IMG = 48, 3, 4, 8, 64
# timm's ViT in FATRViT's (mmseg's) arguments: patch bias, LayerNorm eps 1e-6, final norm.
TIMM_LIKE = dict(norm_cfg=dict(type="LN", eps=1e-6), patch_bias=True, final_norm=True)
REDUCTION = dict(layers=(2, 3, 4), keep_ratio=0.6, windows=(2, 2, 1))


def load_tool():
    spec = importlib.util.spec_from_file_location("convert_weights", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()


def randomize_(model, seed):
    model.eval()  # mmseg's VisionTransformer.train() returns None
    return randomize_weights(model, seed)


def timm_vit(img_size=IMG, seed=0):
    torch.manual_seed(seed)
    model = TimmViT(img_size=img_size, patch_size=PATCH, embed_dim=EMBED, depth=DEPTH,
                    num_heads=HEADS, num_classes=10)  # fmt: skip
    return randomize_(model, seed)


def mmseg_vit(img_size=IMG, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = MMSegViT(img_size=img_size, patch_size=PATCH, embed_dims=EMBED, num_layers=DEPTH,
                     num_heads=HEADS, norm_cfg=dict(type="LN", eps=1e-6), final_norm=True,
                     with_cls_token=True, interpolate_mode="bicubic", **kwargs)  # fmt: skip
    return randomize_(model, seed)


def fatr_vit(checkpoint=None, img_size=IMG, **kwargs):
    kwargs = dict(img_size=img_size, patch_size=PATCH, embed_dims=EMBED, num_layers=DEPTH,
                  num_heads=HEADS, **{**TIMM_LIKE, **kwargs})  # fmt: skip
    if checkpoint is not None:
        kwargs["init_cfg"] = dict(type="Pretrained", checkpoint=str(checkpoint))
    model = MODELS.build(dict(type="FATRViT", **kwargs))
    model.init_weights()
    return model.eval()


def tokens(feature_map):
    """(B, C, H, W) -> (B, H·W, C), the order of a ViT's patch tokens."""
    return feature_map.flatten(2).transpose(1, 2)


def images(B, size, seed=0):
    return torch.randn(B, 3, *size, generator=torch.Generator().manual_seed(seed))


def timm_at(model, img_size):
    """A copy of timm ``model`` built for ``img_size``, pos_embed resampled by timm (bicubic)."""
    state = dict(model.state_dict())
    grid = (img_size[0] // PATCH, img_size[1] // PATCH)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], grid, antialias=False)
    out = TimmViT(img_size=img_size, patch_size=PATCH, embed_dim=EMBED, depth=DEPTH,
                  num_heads=HEADS, num_classes=10)  # fmt: skip
    out.load_state_dict(state, strict=True)
    return out.eval()


@pytest.fixture(scope="module")
def timm_model():
    return timm_vit()


@pytest.fixture(scope="module")
def timm_ckpt(timm_model, tmp_path_factory):
    """The timm model's state dict, converted with the tool."""
    tmp = tmp_path_factory.mktemp("timm")
    torch.save(timm_model.state_dict(), tmp / "timm.pth")
    tool.convert(str(tmp / "timm.pth"), str(tmp / "fatr.pth"))
    return tmp / "fatr.pth"


# ---------------------------------------------------------------------------------------------
# timm


@torch.no_grad()
def test_timm_checkpoint_gives_timm_features(timm_model, timm_ckpt):
    ours = fatr_vit(timm_ckpt)
    x = images(2, (IMG, IMG))
    assert_close(tokens(ours(x)[0]), timm_model.forward_features(x)[:, 1:], atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("size", [(48, 80), (96, 72)])
def test_timm_features_at_another_input_size(timm_model, timm_ckpt, size):
    """Input size != img_size: the pos_embed is interpolated like timm's (no antialias)."""
    ours = fatr_vit(timm_ckpt)
    x = images(1, size, seed=1)
    ref = timm_at(timm_model, size).forward_features(x)[:, 1:]
    assert_close(tokens(ours(x)[0]), ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_pretrained_pos_embed_is_resized_to_img_size(timm_model, timm_ckpt):
    """A 64² checkpoint into an (80, 48) backbone: the stored pos_embed itself is resampled."""
    size = (80, 48)
    ours = fatr_vit(timm_ckpt, img_size=size)
    ref = resample_abs_pos_embed(timm_model.pos_embed, (10, 6), antialias=False)
    assert_close(ours.pos_embed, ref, atol=1e-6, rtol=1e-6)
    x = images(1, size, seed=2)
    assert_close(tokens(ours(x)[0]), timm_at(timm_model, size).forward_features(x)[:, 1:],
                 atol=1e-4, rtol=1e-4)  # fmt: skip


def test_resize_pos_embed_rejects_a_non_square_grid():
    with pytest.raises(CheckpointError, match="not a square grid"):
        resize_pos_embed(torch.zeros(1, 1 + 12, 4), (4, 4))


def test_raw_timm_and_safetensors_checkpoints_load(timm_model, tmp_path):
    """init_cfg accepts unconverted timm weights too, in .pth and .safetensors form."""
    from safetensors.torch import save_file

    torch.save({"model": timm_model.state_dict()}, tmp_path / "raw.pth")
    save_file(timm_model.state_dict(), str(tmp_path / "raw.safetensors"))
    x = images(1, (IMG, IMG), seed=3)
    with torch.no_grad():
        ref = timm_model.forward_features(x)[:, 1:]
        for name in ("raw.pth", "raw.safetensors"):
            assert_close(tokens(fatr_vit(tmp_path / name)(x)[0]), ref, atol=1e-4, rtol=1e-4)


def test_reduced_backbone_loads_the_same_checkpoint(timm_model, timm_ckpt):
    """Only the reduction's own parameters are absent from a plain ViT checkpoint; keep init."""
    ours = fatr_vit(timm_ckpt, reduction=REDUCTION)
    ckpt = torch.load(timm_ckpt, weights_only=True)["state_dict"]
    own = ours.state_dict()
    extra = sorted(set(own) - set(ckpt))
    assert extra and all(k.endswith(("omega1", "omega2", "dc_pos")) for k in extra), extra
    for k, v in ckpt.items():
        assert torch.equal(own[k], v), k
    for k in extra:
        expected = 0.0  # reweight="identity": omega1 = 0, omega2 (stored as 1 + w2) = 0
        assert torch.equal(own[k], torch.full_like(own[k], expected)), k


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_layers=DEPTH - 1), r"unexpected \['blocks\.3\."),
        (dict(num_layers=DEPTH + 1), r"missing \['blocks\.4\."),
        (dict(embed_dims=2 * EMBED, num_heads=HEADS), r"shape mismatch.*cls_token"),
        (dict(mlp_ratio=2.0), r"shape mismatch.*mlp\.fc1\.weight"),
        (dict(patch_size=2 * PATCH), r"shape mismatch.*patch_embed\.proj\.weight"),
    ],
)
def test_mismatched_checkpoint_names_the_problem(timm_ckpt, kwargs, match):
    cfg = dict(img_size=IMG, patch_size=PATCH, embed_dims=EMBED, num_layers=DEPTH,
               num_heads=HEADS, **TIMM_LIKE)  # fmt: skip
    cfg["init_cfg"] = dict(type="Pretrained", checkpoint=str(timm_ckpt))
    model = MODELS.build(dict(type="FATRViT", **{**cfg, **kwargs}))
    with pytest.raises(CheckpointError, match=match) as err:
        model.init_weights()
    assert str(timm_ckpt) in str(err.value)


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "pretrain" / "vit_small_patch16_384.pth"
    model = MODELS.build(dict(type="FATRViT", img_size=IMG, patch_size=PATCH, embed_dims=EMBED,
                              num_layers=1, num_heads=HEADS,
                              init_cfg=dict(type="Pretrained", checkpoint=str(path))))  # fmt: skip
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {path}.*Pretrained weights"):
        model.init_weights()


# ---------------------------------------------------------------------------------------------
# mmseg VisionTransformer and Segmenter


@torch.no_grad()
@pytest.mark.parametrize("patch_bias", [False, True])  # False: mmseg's default and Segmenter's
def test_mmseg_checkpoint_gives_mmseg_features(tmp_path, patch_bias):
    ref = mmseg_vit(patch_bias=patch_bias, out_indices=(1, DEPTH - 1))
    torch.save({"state_dict": ref.state_dict(), "meta": {"iter": 3}}, tmp_path / "mmseg.pth")
    tool.convert(str(tmp_path / "mmseg.pth"), str(tmp_path / "fatr.pth"))
    ours = fatr_vit(tmp_path / "fatr.pth", out_indices=(1, DEPTH - 1))
    # The checkpoint's size, then a non-square size mmseg resizes its pos_embed for at run time.
    for size in [(IMG, IMG), (48, 88)]:
        x = images(2, size, seed=4)
        expected = ref(x)
        got = ours(x)
        assert len(got) == len(expected) == 2
        for a, b in zip(got, expected):
            assert a.shape == b.shape
            assert_close(a, b, atol=1e-4, rtol=1e-4)


def tiny_segmentor(backbone_type, num_classes=5, **backbone):
    backbone = dict(type=backbone_type, img_size=IMG, patch_size=PATCH, embed_dims=EMBED,
                    num_layers=DEPTH, num_heads=HEADS, **backbone)  # fmt: skip
    backbone.update(norm_cfg=dict(type="LN", eps=1e-6), final_norm=True, with_cls_token=True,
                    interpolate_mode="bicubic")  # fmt: skip
    if backbone_type == "FATRViT":
        backbone.update(patch_bias=True)  # the converted checkpoint holds a (zero) patch bias
    head = dict(type="SegmenterMaskTransformerHead", in_channels=EMBED, channels=EMBED,
                num_classes=num_classes, num_layers=1, num_heads=HEADS, embed_dims=EMBED,
                dropout_ratio=0.0)  # fmt: skip
    cfg = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[127.5] * 3, std=[127.5] * 3),
        backbone=backbone,
        decode_head=head,
        test_cfg=ConfigDict(mode="whole"),
    )
    return MODELS.build(cfg)


@torch.no_grad()
def test_segmenter_checkpoint_converts_whole(tmp_path):
    """A Segmenter checkpoint (backbone.* + decode_head.*) keeps its head and loads strictly."""
    ref = randomize_(tiny_segmentor("VisionTransformer"), seed=5)
    torch.save({"state_dict": ref.state_dict(), "meta": {}}, tmp_path / "segmenter.pth")
    summary = tool.convert(str(tmp_path / "segmenter.pth"), str(tmp_path / "fatr.pth"))
    assert summary.startswith("mmseg ViT (4 blocks)")
    assert "added ['backbone.patch_embed.proj.bias']" in summary

    ours = tiny_segmentor("FATRViT")
    load_checkpoint(ours, str(tmp_path / "fatr.pth"), map_location="cpu", strict=True)
    ours.eval()
    x = images(2, (IMG, 40), seed=6)
    assert_close(ours.extract_feat(x), ref.extract_feat(x), atol=1e-4, rtol=1e-4)
    assert_close(ours._forward(x), ref._forward(x), atol=1e-4, rtol=1e-4)

    # The same checkpoint as a backbone init_cfg: the head's keys are ignored.
    backbone = fatr_vit(tmp_path / "segmenter.pth")
    assert_close(backbone(x)[0], ref.backbone(x)[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The tool's command line


def run_tool(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["convert_weights.py", *map(str, args)])
    try:
        tool.main()
    except SystemExit as exit_:
        return exit_.code, capsys.readouterr()
    return 0, capsys.readouterr()


def test_tool_summary_and_output_format(timm_model, tmp_path, monkeypatch, capsys):
    torch.save(timm_model.state_dict(), tmp_path / "timm.pth")
    dst = tmp_path / "pretrain" / "vit.pth"
    code, out = run_tool(monkeypatch, capsys, tmp_path / "timm.pth", dst, "--format", "timm")
    assert code == 0
    lines = out.out.strip().splitlines()
    n = len(timm_model.state_dict()) - 2
    assert lines == [f"timm ViT (4 blocks) -> {dst}: {n} tensors, dropped 2 "
                     "['head.bias', 'head.weight']"]  # fmt: skip
    saved = torch.load(dst, weights_only=True)
    assert list(saved) == ["state_dict"]
    assert detect_format(saved["state_dict"]) == "fatr"
    expected = {k: v for k, v in timm_model.state_dict().items() if not k.startswith("head.")}
    assert_close(saved["state_dict"], expected, rtol=0, atol=0)


def test_tool_conversion_is_idempotent(timm_ckpt, tmp_path):
    """Converting a converted checkpoint changes nothing and drops nothing."""
    summary = tool.convert(str(timm_ckpt), str(tmp_path / "again.pth"))
    assert "dropped 0" in summary
    first = torch.load(timm_ckpt, weights_only=True)["state_dict"]
    second = torch.load(tmp_path / "again.pth", weights_only=True)["state_dict"]
    assert_close(second, first, rtol=0, atol=0)
    assert convert_state_dict(first).keys() == first.keys()


@pytest.mark.parametrize(
    "make, args, match",
    [
        (None, ("--format", "auto"), "error: checkpoint not found: {src}"),
        (lambda p: p.write_text("not a checkpoint"), (), "error: cannot read checkpoint {src}"),
        (lambda p: torch.save({"fc.weight": torch.zeros(2, 2)}, p), (),
         "error: unrecognised checkpoint: expected timm ViT keys"),
        ("mmseg", ("--format", "timm"), "error: {src} is not a timm checkpoint: its keys are mm"),
        ("timm", ("--format", "mmseg"), "error: {src} is not a mmseg checkpoint: its keys are ti"),
    ],
)  # fmt: skip
def test_tool_bad_input_is_one_line(make, args, match, timm_model, tmp_path, monkeypatch, capsys):
    src = tmp_path / "src.pth"
    if make == "timm":
        torch.save(timm_model.state_dict(), src)
    elif make == "mmseg":
        torch.save(mmseg_vit().state_dict(), src)
    elif make is not None:
        make(src)
    code, out = run_tool(monkeypatch, capsys, src, tmp_path / "dst.pth", *args)
    assert isinstance(code, str) and code.startswith(match.format(src=src)), code
    assert "\n" not in code
    assert not (tmp_path / "dst.pth").exists()


def test_tool_rejects_npz(tmp_path, monkeypatch, capsys):
    src = tmp_path / "ViT-S_16.npz"
    src.write_bytes(b"PK")
    code, _ = run_tool(monkeypatch, capsys, src, tmp_path / "dst.pth")
    assert code.startswith(f"error: unsupported checkpoint type .npz for {src}")


# ---------------------------------------------------------------------------------------------
# Full-size ViT-S/16 through the command line


@pytest.mark.slow
@torch.no_grad()
def test_timm_vit_small_patch16_384_end_to_end(tmp_path):
    torch.manual_seed(0)
    timm_model = randomize_(timm.create_model("vit_small_patch16_384", pretrained=False), 7)
    torch.save(timm_model.state_dict(), tmp_path / "timm.pth")
    dst = tmp_path / "pretrain" / "vit_small_patch16_384.pth"
    proc = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "timm.pth"), str(dst)],
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"timm ViT (12 blocks) -> {dst}: 150 tensors, dropped 2 "
                                   "['head.bias', 'head.weight']")  # fmt: skip

    def build(**kwargs):
        cfg = dict(type="FATRViT", img_size=384, patch_size=16, embed_dims=384, num_layers=12,
                   num_heads=6, init_cfg=dict(type="Pretrained", checkpoint=str(dst)),
                   **TIMM_LIKE)  # fmt: skip
        model = MODELS.build({**cfg, **kwargs})
        model.init_weights()
        return model.eval()

    x = images(1, (384, 384), seed=8)
    ref = timm_model.forward_features(x)[:, 1:]
    assert_close(tokens(build()(x)[0]), ref, atol=1e-4, rtol=1e-4)

    # The main config's 512² backbone: pos_embed resized on load, against timm at 512².
    x = images(1, (512, 512), seed=9)
    state = dict(timm_model.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (32, 32), antialias=False)
    ref_model = timm.create_model("vit_small_patch16_384", pretrained=False, img_size=512)
    ref_model.load_state_dict(state, strict=True)
    ref = ref_model.eval().forward_features(x)[:, 1:]
    assert_close(tokens(build(img_size=512)(x)[0]), ref, atol=1e-4, rtol=1e-4)

    # The reduced backbone loads the same file (only ω and DC positions are new) and runs.
    reduced = build(img_size=512, reduction=dict(layers=(4, 7, 10), keep_ratio=0.7,
                                                  windows=(2, 2, 1)))  # fmt: skip
    assert isinstance(reduced, FATRViT)
    new = set(reduced.state_dict()) - set(torch.load(dst, weights_only=True)["state_dict"])
    assert new and all(k.endswith(("omega1", "omega2", "dc_pos")) for k in new)
    assert reduced(x)[0].shape == (1, 384, 32, 32)


def test_runner_checkpoint_loads_without_changing_the_global_allow_list(tmp_path):
    """A checkpoint as mmengine's Runner writes it (message hub with HistoryBuffers, numpy
    scalars) reads with weights_only=True; the classes are allowed for that read only."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    from fatr_seg.models.convert import load_checkpoint_file

    buf = HistoryBuffer()
    buf.update(1.5)
    state = {"w": torch.randn(2, 3)}
    path = tmp_path / "iter_10.pth"
    torch.save({"meta": {"iter": 10, "eta": np.float64(3.0)}, "state_dict": state,
                "message_hub": {"log_scalars": {"train/loss": buf}}}, path)  # fmt: skip
    before = list(torch.serialization.get_safe_globals())
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # the plain read refuses it: the test is not vacuous
    got = load_checkpoint_file(str(path))
    assert torch.equal(got["w"], state["w"])
    # as sets: torch restores the allow-list from a copy, whose order may differ
    assert set(torch.serialization.get_safe_globals()) == set(before)
