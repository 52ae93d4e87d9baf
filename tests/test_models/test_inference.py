"""mmseg's inference APIs and slide inference on a (shrunk) FATR config and generated images."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmseg.apis import inference_model, init_model
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg.utils import register_all_modules
from tiny_configs import tiny_overrides
from torch.testing import assert_close

from fatr_seg.datasets import CLASSES, PALETTE, generate_sample
from fatr_seg.models import FATRViT

register_all_modules()
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "fatr_ade20k.py"
EMBED, HEADS, DEPTH, PATCH = 48, 3, 6, 16
# `--cfg-options`-style overrides: a toy model with the main config's structure, small crops, and
# a test pipeline that keeps a small image at its own size.
TINY = {
    **tiny_overrides(EMBED, HEADS, DEPTH, PATCH, num_classes=len(CLASSES)),
    "model.backbone.reduction.layers": (2, 4, 5),
    "model.test_cfg.crop_size": (64, 64),
    "model.test_cfg.stride": (48, 48),
    "test_pipeline.1.scale": (128, 96),
}


@pytest.fixture(scope="module")
def config():
    return Config.fromfile(str(CONFIG))


def tiny(config, **options):
    cfg = copy.deepcopy(config)
    cfg.merge_from_dict({**TINY, **options})
    return cfg


def bgr_image(seed, size):
    image, _ = generate_sample(np.random.default_rng(seed), size=size)
    return np.ascontiguousarray(image[..., ::-1])  # mmseg's ndarray input is BGR


def check_result(result, shape):
    assert isinstance(result, SegDataSample)
    pred = result.pred_sem_seg.data
    assert pred.shape == (1, *shape) and pred.dtype == torch.int64
    assert 0 <= int(pred.min()) and int(pred.max()) < len(CLASSES)
    assert result.seg_logits.data.shape == (len(CLASSES), *shape)
    assert torch.equal(pred[0], result.seg_logits.data.argmax(0))


def test_init_model_and_inference_model(config, tmp_path):
    """From the config path (weights random), then from a saved checkpoint with its metadata."""
    model = init_model(str(CONFIG), checkpoint=None, device="cpu", cfg_options=TINY)
    assert isinstance(model.backbone, FATRViT) and not model.training
    assert model.backbone.reduction.layers == (2, 4, 5)
    img = bgr_image(0, (96, 128))
    result = inference_model(model, img)
    check_result(result, (96, 128))

    with torch.no_grad():  # make the saved weights differ from a fresh build's
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = tmp_path / "tiny.pth"
    meta = dict(dataset_meta=dict(classes=CLASSES, palette=PALETTE))
    torch.save({"state_dict": model.state_dict(), "meta": meta}, ckpt)
    loaded = init_model(tiny(config), checkpoint=str(ckpt), device="cpu")
    assert loaded.dataset_meta["classes"] == CLASSES
    assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    expected = inference_model(model, img)
    again = inference_model(loaded, img)
    assert_close(again.seg_logits.data, expected.seg_logits.data, rtol=0, atol=0)
    assert not torch.equal(expected.seg_logits.data, result.seg_logits.data)

    other = bgr_image(1, (96, 128))  # mmseg batches images of one size only
    batch = inference_model(loaded, [img, other])
    assert len(batch) == 2
    assert_close(batch[0].seg_logits.data, expected.seg_logits.data, rtol=1e-5, atol=1e-5)
    assert_close(batch[1].seg_logits.data, inference_model(loaded, other).seg_logits.data,
                 rtol=1e-5, atol=1e-5)  # fmt: skip


@torch.no_grad()
def test_slide_inference_on_a_non_square_image(config):
    """200x330 with 128 crops, stride 96: 2x4 crops, every crop 128x128, full-size output."""
    cfg = tiny(config, **{"model.test_cfg.crop_size": (128, 128),
                          "model.test_cfg.stride": (96, 96)})  # fmt: skip
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    assert model.test_cfg.mode == "slide"
    seen = []
    hook = model.backbone.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    x = torch.randn(1, 3, 200, 330, generator=torch.Generator().manual_seed(1))
    meta = dict(img_shape=(200, 330), ori_shape=(200, 330), pad_shape=(200, 330))
    (result,) = model.predict(x, [SegDataSample(metainfo=meta)])
    hook.remove()
    # The configs' BatchedSlideEncoderDecoder: the 8 crops go through the model as one batch.
    assert seen == [(8, 3, 128, 128)]
    check_result(result, (200, 330))

    # Rows 0-71 x columns 0-95 lie in the first crop only: there slide = whole on that crop.
    crop = model.encode_decode(x[..., :128, :128], [dict(img_shape=(128, 128))])
    assert_close(result.seg_logits.data[:, :72, :96], crop[0, :, :72, :96], rtol=1e-5, atol=1e-5)

    model.test_cfg.mode = "whole"  # the same image whole: 13x21 patches (padded), full size back
    (whole,) = model.predict(x, [SegDataSample(metainfo=meta)])
    check_result(whole, (200, 330))
