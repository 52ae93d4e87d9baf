"""Stock mmseg heads on FATRViT: shapes identical to mmseg's VisionTransformer, training works."""

import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg.utils import register_all_modules

import fatr_seg.models  # noqa: F401  (registers FATRViT)

register_all_modules()
EMBED, HEADS, DEPTH, PATCH, CLASSES = 48, 3, 12, 8, 5
# The main config's reduction, on a 12-block toy ViT.
REDUCTION = dict(method="fatr", layers=(4, 7, 10), keep_ratio=0.7, windows=(2, 2, 1),
                 score="exact", reweight="identity", restore="dc")  # fmt: skip


def backbone_cfg(kind, out_indices):
    cfg = dict(img_size=64, patch_size=PATCH, embed_dims=EMBED, num_layers=DEPTH,
               num_heads=HEADS, out_indices=out_indices)  # fmt: skip
    if kind == "fatr":
        return dict(type="FATRViT", reduction=REDUCTION, **cfg)
    return dict(type="VisionTransformer", norm_cfg=dict(type="LN", eps=1e-6), final_norm=True,
                with_cls_token=True, interpolate_mode="bicubic", **cfg)  # fmt: skip


def segmenter_mask():
    head = dict(type="SegmenterMaskTransformerHead", in_channels=EMBED, channels=EMBED,
                num_classes=CLASSES, num_layers=1, num_heads=HEADS, embed_dims=EMBED,
                dropout_ratio=0.0)  # fmt: skip
    return -1, None, head, 1


def segmenter_linear():
    """mmseg's segmenter_vit-s_fcn config: FCNHead as a linear classifier."""
    head = dict(type="FCNHead", in_channels=EMBED, channels=EMBED, num_convs=0, kernel_size=1,
                dropout_ratio=0.0, concat_input=False, num_classes=CLASSES)  # fmt: skip
    return -1, None, head, 1


def upernet():
    out_indices = (3, 5, 7, 11)
    neck = dict(type="MultiLevelNeck", in_channels=[EMBED] * 4, out_channels=EMBED,
                scales=[4, 2, 1, 0.5])  # fmt: skip
    head = dict(type="UPerHead", in_channels=[EMBED] * 4, in_index=[0, 1, 2, 3],
                pool_scales=(1, 2, 3, 6), channels=32, dropout_ratio=0.1, num_classes=CLASSES,
                norm_cfg=dict(type="BN", requires_grad=True), align_corners=False)  # fmt: skip
    return out_indices, neck, head, 4  # logits at 4x the patch grid (the neck's largest scale)


HEADS_CFGS = {"segmenter_mask": segmenter_mask, "segmenter_linear": segmenter_linear,
              "upernet": upernet}  # fmt: skip


def segmentor(kind, head_name):
    out_indices, neck, head, _ = HEADS_CFGS[head_name]()
    cfg = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3),
        backbone=backbone_cfg(kind, out_indices),
        decode_head=dict(loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0), **head),
        test_cfg=ConfigDict(mode="whole"),
    )
    if neck is not None:
        cfg["neck"] = neck
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


def images(B, size, seed=0):
    return torch.randn(B, 3, *size, generator=torch.Generator().manual_seed(seed))


SIZES = [(64, 64), (56, 72), (45, 70)]  # the last is padded to 48x72 by both patch embeddings


@torch.no_grad()
@pytest.mark.parametrize("out_indices", [-1, (3, 5, 7, 11), (0, 4, 11)])
def test_backbone_outputs_match_mmseg_vit_shapes(out_indices):
    ours = MODELS.build(backbone_cfg("fatr", out_indices)).eval()
    ref = MODELS.build(backbone_cfg("mmseg", out_indices))
    ref.eval()
    for size in SIZES:
        x = images(2, size)
        got, expected = ours(x), ref(x)
        assert isinstance(got, tuple) and len(got) == len(expected)
        assert [o.shape for o in got] == [o.shape for o in expected]


@pytest.mark.parametrize("head_name", list(HEADS_CFGS))
def test_stock_head_on_fatr_vit(head_name):
    """Same logits shape as on mmseg's ViT; loss, backward and full-size prediction work."""
    *_, scale = HEADS_CFGS[head_name]()
    ours, ref = segmentor("fatr", head_name), segmentor("mmseg", head_name)
    ours.eval()
    ref.eval()
    size = (56, 72)
    x = images(2, size, seed=1)
    with torch.no_grad():
        logits = ours._forward(x)
        assert logits.shape == ref._forward(x).shape
    assert logits.shape == (2, CLASSES, scale * 7, scale * 9)
    assert torch.isfinite(logits).all()

    ours.train()
    gen = torch.Generator().manual_seed(2)
    samples = [SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, CLASSES, (1, *size),
                                                                     generator=gen)))
               for _ in range(2)]  # fmt: skip
    losses = ours.loss(x, samples)
    loss = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(loss)
    loss.backward()
    backbone = dict(ours.backbone.named_parameters())
    blocks_used = max(ours.backbone.out_indices)
    # Blocks beyond the last output index never run; everything before must get a gradient.
    for name, p in backbone.items():
        if name.startswith("blocks.") and int(name.split(".")[1]) > blocks_used:
            continue
        if name.startswith("norm.") and blocks_used != DEPTH - 1:
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    head_grads = [p.grad for p in ours.decode_head.parameters() if p.requires_grad]
    assert head_grads and all(g is not None for g in head_grads)

    ours.eval()
    with torch.no_grad():
        meta = dict(img_shape=size, ori_shape=size, pad_shape=size)
        preds = ours.predict(x, [SegDataSample(metainfo=meta) for _ in range(2)])
    assert [p.pred_sem_seg.data.shape for p in preds] == [(1, *size)] * 2
    assert all(int(p.pred_sem_seg.data.max()) < CLASSES for p in preds)
