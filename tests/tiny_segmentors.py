"""Tiny segmentors, teacher checkpoints and labelled batches for the distillation tests."""

import copy
import math

import torch
from mmengine.config import ConfigDict
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch import nn

EMBED, HEADS, DEPTH, PATCH, IMG, CLASSES = 32, 2, 4, 8, 64, 5

# timm's settings, as the repo's configs state them (FATRViT's own defaults are mmseg's).
BACKBONE = dict(type="FATRViT", img_size=(IMG, IMG), patch_size=PATCH, embed_dims=EMBED,
                num_layers=DEPTH, num_heads=HEADS, drop_path_rate=0.0, patch_bias=True,
                final_norm=True, norm_cfg=dict(type="LN", eps=1e-6),
                reduction=dict(layers=(2, 3), keep_ratio=0.5), compact_output=True)  # fmt: skip
CE = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
HEAD = dict(type="FATRSegmenterHead", in_channels=EMBED, channels=EMBED, num_heads=HEADS,
            embed_dims=EMBED, num_layers=1, num_classes=CLASSES, dropout_ratio=0.0,
            loss_decode=CE)  # fmt: skip


def segmentor_cfg(reduction="default", **backbone) -> dict:
    """The tiny FATR Segmenter (``reduction='default'``: FATR at blocks 2 and 3, keep 0.5)."""
    cfg = dict(backbone=copy.deepcopy(BACKBONE), decode_head=copy.deepcopy(HEAD),
               test_cfg=ConfigDict(mode="whole"))  # fmt: skip
    if reduction != "default":
        cfg["backbone"]["reduction"] = reduction
    cfg["backbone"].update(backbone)
    return cfg


def distill_cfg(teacher_checkpoint, reduction="default", backbone=None, **kwargs) -> dict:
    return dict(type="DistillEncoderDecoder", teacher_checkpoint=str(teacher_checkpoint),
                **segmentor_cfg(reduction, **(backbone or {})), **kwargs)  # fmt: skip


def randomize_(model: nn.Module, seed: int, other: float = 0.1) -> nn.Module:
    """Deterministic weights far from any init, so that loading or not loading shows: peaked
    attention, non-trivial norms and embeddings (``other``: the scale of the remaining 1-d
    parameters, e.g. biases and FATR's ω)."""
    gen = torch.Generator().manual_seed(seed)
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if id(p) in norms:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif name.endswith(("cls_token", "pos_embed", "dc_pos")):
                p.copy_(0.5 * noise)
            elif p.dim() >= 2:
                p.copy_(1.5 * noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(other * noise)
    return model


def plain_segmentor(reduction="default", seed=None, **backbone) -> nn.Module:
    """The tiny segmentor as mmseg's ``EncoderDecoder`` (``reduction=None``: the teacher)."""
    model = MODELS.build(dict(type="EncoderDecoder", **segmentor_cfg(reduction, **backbone)))
    return model if seed is None else randomize_(model, seed)


def save_teacher(path, seed: int = 0) -> dict:
    """Write a trained-looking unreduced segmentor checkpoint (fatr_seg's format); its state."""
    model = plain_segmentor(reduction=None, compact_output=False, seed=seed)
    state = model.state_dict()
    torch.save({"meta": {"iter": 7}, "state_dict": state}, path)
    return state


def batch(batch_size: int = 2, seed: int = 0, size: int = IMG, void_rows: int = 8):
    """Images and ``SegDataSample`` labels; the top ``void_rows`` rows are ignored (255)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=gen)
    samples = []
    for _ in range(batch_size):
        label = torch.randint(0, CLASSES, (1, size, size), generator=gen)
        label[:, :void_rows] = 255
        meta = dict(img_shape=(size, size), pad_shape=(size, size), ori_shape=(size, size))
        sample = SegDataSample(metainfo=meta)
        sample.gt_sem_seg = PixelData(data=label)
        samples.append(sample)
    return images, samples
