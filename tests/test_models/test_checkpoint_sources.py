"""Every checkpoint source a user has: local files, URLs and model-zoo prefixes.

URLs are served from 127.0.0.1 by an ``http.server`` in a thread; downloads land in a temporary
``TORCH_HOME``. Also: which weights FATRViT leaves out, like mmseg's ``VisionTransformer``, when
it was built without the part they belong to.
"""

import functools
import http.server
import importlib.util
import logging
import socket
import threading
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmseg.models.backbones import VisionTransformer
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
from safetensors.torch import save_file
from torch.testing import assert_close

from fatr_seg.models import CheckpointError
from fatr_seg.models import backbone as backbone_module
from fatr_seg.models.convert import load_checkpoint_file
from fatr_seg.models.preflight import PreflightError, check_config_paths

register_all_modules()
BASE = dict(img_size=32, patch_size=8, embed_dims=32, num_layers=2, num_heads=2)
TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_weights.py"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(folder served, base URL); downloads go to a fresh TORCH_HOME, never through a proxy."""
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def mmseg_vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = VisionTransformer(**{**BASE, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval()  # mmseg's VisionTransformer.train() returns None
    return model


def fatr_vit(checkpoint, **kwargs):
    model = MODELS.build(dict(type="FATRViT", **{**BASE, **kwargs},
                              init_cfg=dict(type="Pretrained", checkpoint=checkpoint)))  # fmt: skip
    model.init_weights()
    return model.eval()


def outputs_match(ours, ref):
    x = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x), strict=True):
            assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_http_checkpoint_loads_through_mmengine(server):
    root, url = server
    ref = mmseg_vit(final_norm=True)
    torch.save({"state_dict": ref.state_dict(), "meta": {}}, root / "vit_mmseg.pth")
    outputs_match(fatr_vit(f"{url}/vit_mmseg.pth", final_norm=True), ref)
    cached = list(Path(torch.hub.get_dir(), "checkpoints").iterdir())
    assert [p.name for p in cached] == ["vit_mmseg.pth"]
    # mmseg's deprecated form, as its zoo configs write it (``model.pretrained``).
    model = MODELS.build(dict(type="FATRViT", **BASE, final_norm=True,
                              pretrained=f"{url}/vit_mmseg.pth"))  # fmt: skip
    model.init_weights()
    outputs_match(model.eval(), ref)


def test_safetensors_url_is_downloaded_once_and_read(server):
    root, url = server
    ref = mmseg_vit(seed=2, patch_bias=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              str(root / "model.safetensors"))  # fmt: skip
    outputs_match(fatr_vit(f"{url}/model.safetensors", patch_bias=True), ref)
    (root / "model.safetensors").unlink()  # the second load reads the cache
    outputs_match(fatr_vit(f"{url}/model.safetensors", patch_bias=True), ref)


@pytest.mark.parametrize("path", ["missing.pth", "missing.safetensors"])
def test_404_is_one_line_naming_the_url(server, path):
    _, url = server
    with pytest.raises(CheckpointError) as err:
        fatr_vit(f"{url}/{path}")
    message = str(err.value)
    assert message.startswith(f"cannot load checkpoint {url}/{path}: HTTPError: HTTP Error 404")
    assert "\n" not in message and "without network access" in message


def test_unreachable_url_is_one_line_naming_the_url(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/vit_small_p16_384.pth"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(url)
    assert str(err.value).startswith(f"cannot load checkpoint {url}: URLError: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("path", ["open-mmlab://no_such_model", "torchvision://no_such_model"])
def test_unknown_zoo_name_is_one_line(path):
    with pytest.raises(CheckpointError, match=f"cannot load checkpoint {path}: KeyError") as err:
        load_checkpoint_file(path)
    assert "\n" not in str(err.value) and "model zoo does not know" in str(err.value)


def test_convert_tool_reads_a_url(server, tmp_path):
    root, url = server
    ref = mmseg_vit(seed=3, final_norm=True)
    torch.save({"state_dict": ref.state_dict()}, root / "mmseg.pth")
    spec = importlib.util.spec_from_file_location("convert_weights", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    dst = tmp_path / "fatr.pth"
    summary = tool.convert(f"{url}/mmseg.pth", str(dst))
    assert summary.startswith(f"mmseg ViT (2 blocks) -> {dst}")
    outputs_match(fatr_vit(str(dst), final_norm=True), ref)


def test_preflight_leaves_urls_to_the_loader_and_checks_local_paths(tmp_path):
    cfg = Config(dict(model=dict(
        pretrained="https://download.openmmlab.com/x/vit.pth",
        backbone=dict(type="FATRViT", init_cfg=dict(type="Pretrained",
                                                    checkpoint="open-mmlab://vit")))))  # fmt: skip
    check_config_paths(cfg, train=True)
    for key in ("model.pretrained", "model.backbone.pretrained",
                "model.backbone.init_cfg.checkpoint"):  # fmt: skip
        missing = Config(cfg.to_dict())
        missing.merge_from_dict({key: str(tmp_path / "pretrain" / "vit.pth")})
        with pytest.raises(PreflightError, match="pretrained checkpoint not found: .*vit.pth"):
            check_config_paths(missing, train=True)


# ---------------------------------------------------------------------------------------------
# Weights of parts the backbone was built without


def test_unused_final_norm_and_patch_bias_are_left_out_like_mmseg(tmp_path, monkeypatch):
    """A timm-like checkpoint (final norm, non-zero patch bias) into mmseg's default ViT."""
    src = mmseg_vit(seed=4, final_norm=True, patch_bias=True, pre_norm=True)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "full.pth")
    ref = mmseg_vit(seed=5)  # final_norm=False, patch_bias=False, no pre-norm: mmseg's defaults
    ref.load_state_dict(src.state_dict(), strict=False)  # what mmseg's init_weights does
    logged = []
    monkeypatch.setattr(
        backbone_module,
        "print_log",
        lambda msg, logger=None, level=logging.INFO: logged.append((msg, level)),
    )
    outputs_match(fatr_vit(str(tmp_path / "full.pth")), ref)
    (warning,) = [msg for msg, level in logged if level == logging.WARNING]
    for part in ("'norm.weight'", "final_norm=False", "'norm_pre.weight'", "pre_norm=False",
                 "'patch_embed.proj.bias'", "patch_bias=False"):  # fmt: skip
        assert part in warning, part


def test_missing_weights_are_still_an_error(tmp_path):
    src = mmseg_vit(seed=6)  # no final norm
    torch.save({"state_dict": src.state_dict()}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"missing \['norm.weight', 'norm.bias'\]"):
        fatr_vit(str(tmp_path / "plain.pth"), final_norm=True)


def test_pretrained_part_takes_the_image_encoder_keys(tmp_path):
    ref = mmseg_vit(seed=7)
    state = {f"image_encoder.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"text_encoder.w": torch.zeros(2), **state}, tmp_path / "part.pth")
    model = MODELS.build(dict(type="FATRViT", **BASE, init_cfg=dict(
        type="Pretrained_Part", checkpoint=str(tmp_path / "part.pth"))))  # fmt: skip
    model.init_weights()
    outputs_match(model.eval(), ref)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_checkpoint_pos_embed_resized_with_interpolate_mode_like_mmseg(tmp_path, mode):
    src = mmseg_vit(seed=8)  # a 4x4 grid
    torch.save({"state_dict": src.state_dict()}, tmp_path / "vit.pth")
    kwargs = dict(img_size=(48, 40), interpolate_mode=mode)
    ref = VisionTransformer(
        **{**BASE, **kwargs}, init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "vit.pth"))
    )
    ref.init_weights()  # mmseg resizes the stored grid to 6x5 with ``mode``
    ours = fatr_vit(str(tmp_path / "vit.pth"), **kwargs)
    assert_close(ours.pos_embed, ref.pos_embed, rtol=1e-6, atol=1e-6)
    ref.eval()
    outputs_match(ours, ref)
