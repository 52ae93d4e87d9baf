"""``tools/train.py`` on the README's first config: mmseg's Segmenter config with FATRViT.

``configs/fatr_segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py`` trains (2 iterations and a
validation, on a tiny generated set at 64², pipelines shrunk) from a local mmseg ViT-S
checkpoint given as mmseg's ``model.pretrained``; a URL that cannot be reached stops it with one
line naming the URL.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmseg.models.backbones import VisionTransformer
from tiny_configs import SMALL_DATA, run_tool_here

from fatr_seg.datasets import write_dataset

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "fatr_segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py"
SMALL = """
_base_ = [{base!r}]
{data}model = dict(data_preprocessor=dict(size=crop_size), pretrained={pretrained!r},
             test_cfg=dict(mode='slide', crop_size=crop_size, stride=(48, 48)))
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "data"
    write_dataset(root, num_train=4, num_val=2, size=64, seed=0, progress=False)
    return root


def write_config(tmp_path, data_root, pretrained):
    config = tmp_path / "small.py"
    data = SMALL_DATA.format(crop=64, batch=1, root=str(data_root))
    config.write_text(SMALL.format(base=str(CONFIG), data=data, pretrained=pretrained))
    return config


def train(tmp_path, data_root, pretrained):
    config = write_config(tmp_path, data_root, pretrained)
    return subprocess.run(
        [sys.executable, "tools/train.py", str(config), "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TORCH_HOME": str(tmp_path / "torch_home")},
    )  # fmt: skip


@pytest.mark.slow
def test_zoo_config_trains_from_an_mmseg_checkpoint(tmp_path, data_root):
    # mmseg's ViT-S/16 at 384² as its Segmenter configs describe it (random weights).
    vit = VisionTransformer(img_size=384, embed_dims=384, num_heads=6, final_norm=True,
                            norm_cfg=dict(type="LN", eps=1e-6))  # fmt: skip
    torch.save({"state_dict": vit.state_dict()}, tmp_path / "vit_small_p16_384.pth")
    proc = train(tmp_path, data_root, str(tmp_path / "vit_small_p16_384.pth"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loaded pretrained backbone from" in proc.stdout
    assert "resizing pos_embed (1, 577, 384) -> (1, 1025, 384)" in proc.stdout
    assert "Iter(train) [2/2]" in proc.stdout and "mIoU" in proc.stdout


@pytest.mark.slow
def test_unreachable_pretrained_url_is_one_line(tmp_path, data_root, monkeypatch):
    """The tool's one-line exit, in this process (the command line ran above)."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/vit_small_p16_384.pth"
    config = write_config(tmp_path, data_root, url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    exit_ = run_tool_here(monkeypatch, ["tools/train.py", config, "--work-dir", tmp_path / "work"])
    assert exit_ is not None and exit_.code != 0
    assert str(exit_.code).startswith(f"error: cannot load checkpoint {url}: URLError")
    assert "\n" not in str(exit_.code)
