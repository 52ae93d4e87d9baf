"""timm ``.safetensors`` checkpoints: ``init_cfg`` Pretrained and ``tools/convert_weights.py``.

The reference is timm itself: ``timm.create_model('vit_tiny_patch16_224', num_classes=0)`` loaded
with the same file. The real ViT-Ti/16 comes from the shared folder (``tests/camvid_data.py``);
those tests skip without it. The tool's safetensors output and its refusal to overwrite are
checked on a small random timm ViT.
"""

import importlib.util
import sys

import pytest
import timm
import torch
from camvid_data import REAL_VIT_TI, REPO, SHARED_HINT, fatr_vit, load_real_vit_ti
from mmengine.config import Config
from mmseg.utils import register_all_modules
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch.testing import assert_close

from fatr_seg.models import CheckpointError
from fatr_seg.models.convert import resize_pos_embed

register_all_modules()
TOOL = REPO / "tools" / "convert_weights.py"
_spec = importlib.util.spec_from_file_location("convert_weights", TOOL)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

NO_VIT = f"real ViT-Ti weights not found at {REAL_VIT_TI} ({SHARED_HINT})"
needs_real_vit = pytest.mark.skipif(not REAL_VIT_TI.is_file(), reason=NO_VIT)


def patch_tokens(feature_map):
    return feature_map.flatten(2).transpose(1, 2)


def images(seed=0):
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def timm_reference():
    """timm's ViT-Ti/16 (no classifier) loaded with the real file, and its features."""
    if not REAL_VIT_TI.is_file():
        pytest.skip(NO_VIT)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False)
    state = {k: v for k, v in load_file(str(REAL_VIT_TI)).items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval().forward_features(images())[:, 1:]  # final norm, CLS dropped


@needs_real_vit
@torch.no_grad()
def test_real_vit_ti_safetensors_gives_timm_features(timm_reference):
    ours = patch_tokens(fatr_vit(REAL_VIT_TI)(images())[0])
    assert ours.shape == (2, 196, 192)
    assert_close(ours, timm_reference, rtol=2e-5, atol=2e-5)


@needs_real_vit
@torch.no_grad()
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_real_vit_ti_converted_loads_to_the_same_weights(timm_reference, tmp_path, suffix):
    dst = tmp_path / f"vit_tiny{suffix}"
    summary = tool.convert(str(REAL_VIT_TI), str(dst))
    assert summary == (f"timm ViT (12 blocks) -> {dst}: 150 tensors, dropped 2 "
                       "['head.bias', 'head.weight']")  # fmt: skip
    direct, converted = fatr_vit(REAL_VIT_TI), fatr_vit(dst)
    assert_close(converted.state_dict(), direct.state_dict(), rtol=0, atol=0)
    assert_close(patch_tokens(converted(images())[0]), timm_reference, rtol=2e-5, atol=2e-5)


@needs_real_vit
def test_camvid_config_loads_the_real_file_strictly():
    """The CamVid config's init_cfg: every tensor of the file, pos_embed resized to 22x22."""
    cfg = Config.fromfile(str(REPO / "configs" / "camvid" / "fatr_vit-t_camvid.py"))
    ours, file = load_real_vit_ti(cfg)
    pos = file.pop("pos_embed")
    assert_close(ours["pos_embed"], resize_pos_embed(pos, (22, 22)), rtol=0, atol=0)
    assert_close({k: ours[k] for k in file}, file, rtol=0, atol=0)
    # Only the reduction's own parameters are not in the file.
    rest = set(ours) - set(file) - {"pos_embed"}
    assert all(k.endswith(("omega1", "omega2", "dc_pos")) for k in rest)


# ---------------------------------------------------------------------------------------------
# The tool's safetensors output and overwrite guard (small random timm ViT, no shared file)


@pytest.fixture()
def small_timm(tmp_path):
    torch.manual_seed(0)
    model = TimmViT(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    return model.eval(), tmp_path / "model.safetensors"


@torch.no_grad()
def test_tool_writes_safetensors_that_init_cfg_loads(small_timm, tmp_path):
    model, src = small_timm
    dst = tmp_path / "pretrain" / "small.safetensors"
    tool.convert(str(src), str(dst))
    saved = load_file(str(dst))  # a flat tensor dict, as the hub stores them
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert_close(saved, expected, rtol=0, atol=0)
    ours = fatr_vit(dst, img_size=32, patch_size=8, embed_dims=24, num_layers=2, num_heads=2)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert_close(patch_tokens(ours(x)[0]), model.forward_features(x)[:, 1:], rtol=1e-5, atol=1e-5)


def test_tool_keeps_an_existing_destination(small_timm, tmp_path):
    _, src = small_timm
    dst = tmp_path / "mine.pth"
    dst.write_bytes(b"user's own file")
    with pytest.raises(CheckpointError, match=f"{dst} exists already: not overwriting it"):
        tool.convert(str(src), str(dst))
    assert dst.read_bytes() == b"user's own file"
    tool.convert(str(src), str(dst), overwrite=True)
    assert "blocks.0.attn.qkv.weight" in torch.load(dst, weights_only=True)["state_dict"]


def test_tool_command_line_refuses_to_overwrite_in_one_line(small_timm, tmp_path, monkeypatch):
    """The tool's one-line exit, its ``main`` in this process (``test_convert.py`` runs the
    command line in a subprocess)."""
    _, src = small_timm
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"x")
    monkeypatch.setattr(sys, "argv", [str(TOOL), str(src), str(dst)])
    with pytest.raises(SystemExit) as exit_:
        tool.main()
    assert str(exit_.value) == (
        f"error: {dst} exists already: not overwriting it (--overwrite replaces it)")  # fmt: skip
    assert dst.read_bytes() == b"x"
