"""``BatchedSlideEncoderDecoder``: the crops of a batch as one batch, equal to mmseg's loop.

The reference is mmseg's own ``EncoderDecoder.slide_inference`` (one window at a time), run on
the same model object; the configs' segmentor type is checked to be the batched one.
"""

import copy
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS
from torch.testing import assert_close

from fatr_seg.models import BatchedSlideEncoderDecoder
from fatr_seg.models.segmentor import slide_windows

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CROP = (64, 64)


def build(reduction, crops_per_batch=None, stride=(40, 48), head=None):
    cfg = Config.fromfile(str(CONFIGS / "fatr_ade20k.py")).model
    bb = cfg.backbone
    bb.update(img_size=CROP, embed_dims=32, num_layers=4, num_heads=2, init_cfg=None,
              drop_path_rate=0.0)  # fmt: skip
    bb.pop("reduction")  # replaced, not merged with the config's keys
    bb["reduction"] = None if reduction is None else dict(reduction, layers=(2, 3, 4))
    cfg.decode_head.update(in_channels=32, channels=32, embed_dims=32, num_heads=2,
                           num_layers=1, num_classes=5)  # fmt: skip
    if head is not None:
        bb.compact_output = False
        cfg.decode_head.type = head
    cfg.test_cfg = dict(mode="slide", crop_size=CROP, stride=stride,
                        crops_per_batch=crops_per_batch)  # fmt: skip
    torch.manual_seed(0)
    return MODELS.build(cfg).eval()


def metas(batch, shape):
    return [dict(ori_shape=shape, img_shape=shape, pad_shape=shape) for _ in range(batch)]


def both(model, x):
    """(batched, mmseg's loop) logits for x; each gets its own copy of the metas."""
    shape = tuple(x.shape[2:])
    with torch.no_grad():
        ours = model.slide_inference(x, metas(x.shape[0], shape))
        ref = EncoderDecoder.slide_inference(model, x, metas(x.shape[0], shape))
    return ours, ref


@pytest.mark.parametrize(
    ("method", "crops_per_batch", "size", "batch"),
    [
        ("fatr", None, (100, 131), 2),  # odd size, 2x3 overlapping windows, all 12 crops at once
        ("fatr_paper", 5, (100, 131), 3),  # chunks that split a window's images
        ("tome", 1, (77, 64), 2),  # one crop per forward: mmseg's batching over images
        (None, 4, (64, 150), 2),  # no reduction
        ("fatr", None, (40, 90), 2),  # image lower than the crop: crops of the image's height
    ],
)
def test_batched_slide_equals_mmseg_loop(method, crops_per_batch, size, batch):
    model = build(None if method is None else dict(method=method), crops_per_batch)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
    ours, ref = both(model, x)
    assert ours.shape == (batch, 5, *size)
    assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_stock_head_on_full_grid_and_stride_equal_to_crop():
    model = build(dict(method="fatr_paper"), stride=CROP, head="SegmenterMaskTransformerHead")
    ours, ref = both(model, torch.randn(2, 3, 96, 130))
    assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_predict_through_the_config_type():
    """mmseg's ``predict`` (slide mode) takes the batched path and gives the loop's labels."""
    model = build(dict(method="fatr"))
    assert type(model) is BatchedSlideEncoderDecoder
    x = torch.randn(2, 3, 90, 100)
    from mmseg.structures import SegDataSample

    samples = [SegDataSample(metainfo=m) for m in metas(2, (90, 100))]
    with torch.no_grad():
        ours = model.predict(x, copy.deepcopy(samples))
        loop = EncoderDecoder.slide_inference
        ref_logits = loop(model, x, metas(2, (90, 100)))
    for s, logits in zip(ours, ref_logits, strict=True):
        assert_close(s.seg_logits.data, logits, rtol=1e-5, atol=1e-6)
        assert torch.equal(s.pred_sem_seg.data[0], logits.argmax(0))


def test_configs_use_the_batched_segmentor():
    for name in (
        "fatr_ade20k.py",
        "baseline_vit-s_ade20k.py",
        "fatr_vit-s_mask_8xb1-160k_ade20k-384x384.py",
    ):
        cfg = Config.fromfile(str(CONFIGS / name))
        assert cfg.model.type == "BatchedSlideEncoderDecoder", name


def test_windows_are_mmsegs():
    # 683 wide, crops 512, stride 341: two windows, the second moved back to end at 683.
    assert slide_windows((512, 683), (512, 512), (341, 341)) == [(0, 512, 0, 512),
                                                                 (0, 512, 171, 683)]  # fmt: skip
    assert slide_windows((40, 40), (64, 64), (48, 48)) == [(0, 40, 0, 40)]


@pytest.mark.parametrize(
    ("test_cfg", "match"),
    [
        (dict(stride=(80, 48)), "stride=.*larger than crop_size"),
        (dict(crops_per_batch=0), "crops_per_batch=0"),
        (dict(crop_size=(0, 64)), "crop_size=.*positive"),
    ],
)
def test_bad_test_cfg_is_named(test_cfg, match):
    model = build(dict(method="fatr"))
    model.test_cfg.update(test_cfg)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        model.slide_inference(torch.randn(1, 3, 80, 80), metas(1, (80, 80)))
