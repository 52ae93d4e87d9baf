"""FATRViT with mmseg ``VisionTransformer``'s arguments computes what ``VisionTransformer`` does.

Each test builds mmseg's own ``VisionTransformer`` and a ``FATRViT`` with the same arguments and
``reduction=None``, loads mmseg's weights into FATRViT through its ``init_cfg`` (the converter
renames mmseg's keys to timm's) and compares outputs in float64, in eval mode and in training
mode (attention dropout with the same seed draws the same mask in both), and gradients.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import ConfigDict
from mmseg.models.backbones import VisionTransformer
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
from torch import nn
from torch.testing import assert_close

from fatr_seg.models import FATRViT
from fatr_seg.models.convert import mmseg_name

register_all_modules()
BASE = dict(img_size=32, patch_size=8, embed_dims=32, num_layers=3, num_heads=2)
TOL = dict(atol=1e-10, rtol=1e-10)


def randomize_(model, seed):
    """Weights far from init (non-trivial norms, biases and embeddings), float64."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            base = 1.0 if (p.dim() == 1 and "ln" in name and name.endswith("weight")) else 0.0
            scale = 1.5 / math.sqrt(p[0].numel()) if p.dim() >= 2 else 0.2
            p.copy_(base + scale * noise)
    return model


def pair(tmp_path, seed=0, **kwargs):
    """(mmseg VisionTransformer, FATRViT) with the same arguments and weights, float64."""
    kwargs = {**BASE, **kwargs}
    torch.manual_seed(seed)
    ref = randomize_(VisionTransformer(**kwargs).double(), seed)
    path = tmp_path / f"mmseg_{seed}.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    ours = MODELS.build(dict(type="FATRViT", init_cfg=dict(type="Pretrained", checkpoint=str(path)),
                             **kwargs)).double()  # fmt: skip
    ours.init_weights()
    return ref, ours


def images(size, seed=1, batch=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=gen, dtype=torch.float64)


def flat(outputs):
    """A backbone's outputs as one flat list of tensors ([map, cls] pairs unpacked)."""
    return [t for o in outputs for t in (o if isinstance(o, list) else [o])]


VARIANTS = {
    "mmseg_defaults": dict(),
    "segmenter": dict(final_norm=True, norm_cfg=dict(type="LN", eps=1e-6), drop_path_rate=0.1),
    "output_cls_token": dict(output_cls_token=True, final_norm=True, out_indices=(0, 2)),
    "patch_norm": dict(patch_norm=True),
    "pre_norm": dict(pre_norm=True, final_norm=True),
    "final_norm_false": dict(final_norm=False, out_indices=(1, 2)),
    "patch_bias": dict(patch_bias=True, mlp_ratio=2),
    "qkv_bias_false": dict(qkv_bias=False),
    "relu": dict(act_cfg=dict(type="ReLU")),
    "gelu_tanh": dict(act_cfg=dict(type="GELU", approximate="tanh")),
    "without_cls_token": dict(with_cls_token=False, final_norm=True),
    "bilinear_pos": dict(interpolate_mode="bilinear"),
    "same_padding": dict(patch_pad="same"),
    "conv_padding": dict(patch_pad=2),
    "out_origin": dict(out_origin=True, output_cls_token=True, out_indices=(1,)),
    "norm_eval": dict(norm_eval=True, final_norm=True),
}


@torch.no_grad()
@pytest.mark.parametrize("size", [(32, 32), (44, 28)])
@pytest.mark.parametrize("name", VARIANTS)
def test_plain_fatrvit_equals_mmseg_vit(tmp_path, name, size):
    ref, ours = pair(tmp_path, **VARIANTS[name])
    ref.eval()
    ours.eval()
    x = images(size)
    expected, got = ref(x), ours(x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert type(a) is type(b)  # a [map, cls] list where mmseg returns one
    for a, b in zip(flat(got), flat(expected), strict=True):
        assert_close(a, b, **TOL)


@pytest.mark.parametrize("with_cp", [False, True])
@pytest.mark.parametrize(
    "extra",
    [dict(), dict(output_cls_token=True, pre_norm=True, patch_norm=True, out_indices=(0, 2))],
    ids=["segmenter", "cls_pre_patch_norm"],
)
def test_training_step_equals_mmseg_vit(tmp_path, with_cp, extra):
    """Train mode, attention dropout on (same seed, same mask), dropout and drop path off."""
    kwargs = dict(final_norm=True, norm_cfg=dict(type="LN", eps=1e-6), attn_drop_rate=0.25,
                  with_cp=with_cp, **extra)  # fmt: skip
    ref, ours = pair(tmp_path, **kwargs)
    ref.train()
    ours.train()
    x = images((40, 32))
    torch.manual_seed(3)
    expected = flat(ref(x))
    torch.manual_seed(3)
    got = flat(ours(x))
    weights = [torch.randn_like(t) for t in expected]
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b, **TOL)
    # Dropout's rescaling shows that the mask was applied (train mode) ...
    ours.eval()
    with torch.no_grad():
        assert not torch.allclose(flat(ours(x))[-1], got[-1])
    ours.train()
    # ... and the backward passes (recomputed under with_cp, same RNG state) agree.
    torch.manual_seed(4)
    sum((t * w).sum() for t, w in zip(flat(ref(x)), weights)).backward()
    torch.manual_seed(4)
    sum((t * w).sum() for t, w in zip(flat(ours(x)), weights)).backward()
    ref_params = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        assert_close(p.grad, ref_params[mmseg_name(n)].grad, **TOL, msg=n)


def test_with_cp_recomputes_each_block_in_backward():
    model = FATRViT(**BASE, with_cp=True, reduction=dict(method="fatr", layers=(2,)))
    calls = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(1, 3, 32, 32)
    out = model(x)[0]
    assert len(calls) == 3
    out.sum().backward()
    assert len(calls) == 6  # every block ran again in the backward pass
    with torch.no_grad():
        model(x)
    assert len(calls) == 9  # no checkpointing without gradients
    model.eval()
    model.with_cp = False
    out_plain = model(x)[0]
    model.with_cp = True
    assert_close(model(x)[0], out_plain, rtol=0, atol=0)


def test_drop_rate_drops_where_mmseg_drops():
    """Dropout modules with p = drop_rate run at the same places on the same shapes.

    mmseg draws the attention projection's mask on a transposed (sequence-first) tensor, so the
    samples differ from FATRViT's; the places and probabilities are the same.
    """
    kwargs = {**BASE, "drop_rate": 0.3}

    def dropouts(model):
        calls = []
        for m in model.modules():
            if isinstance(m, nn.Dropout) and m.p > 0:
                m.register_forward_hook(lambda m, i, o: calls.append((m.p, tuple(i[0].shape))))
        model.train()
        model(torch.randn(2, 3, 32, 40))
        return calls

    expected = dropouts(VisionTransformer(**kwargs))
    assert len(expected) == 1 + 3 * BASE["num_layers"]
    assert dropouts(FATRViT(**kwargs)) == expected


def test_norm_eval_keeps_layernorms_in_eval_mode():
    model = FATRViT(**BASE, norm_eval=True, final_norm=True).train()
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * BASE["num_layers"] + 1
    assert model.training and not any(m.training for m in norms)
    assert all(m.training for m in FATRViT(**BASE).train().modules())


def test_norm_cfg_requires_grad_false_freezes_every_norm():
    model = FATRViT(**BASE, final_norm=True, pre_norm=True, patch_norm=True,
                    norm_cfg=dict(type="LN", eps=1e-6, requires_grad=False))  # fmt: skip
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    norms = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)
             for k in ("weight", "bias")}  # fmt: skip
    assert frozen == norms and len(norms) == 2 * (2 * BASE["num_layers"] + 3)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, nn.LayerNorm))


@pytest.mark.parametrize(
    "frozen_exclude", [["all"], [], ["pos_embed"], ["layers.1", "ln1"], ["blocks.1", "cls_token"]]
)
def test_frozen_exclude_freezes_what_mmseg_freezes(frozen_exclude):
    """mmseg's spelling (``layers.1``, ``ln1``) and fatr_seg's (``blocks.1``) both work."""
    kwargs = dict(BASE, final_norm=True, frozen_exclude=frozen_exclude)
    ref = {n: p.requires_grad for n, p in VisionTransformer(**kwargs).named_parameters()}
    ours = FATRViT(**kwargs, patch_bias=False)
    got = {mmseg_name(n): p.requires_grad for n, p in ours.named_parameters()}
    if frozen_exclude[:1] == ["blocks.1"]:
        # fatr_seg's names: block 1 alone (mmseg's "layers.1" also matches every block's
        # "ffn.layers.1", the second MLP layer).
        ref = {n: n.startswith("layers.1.") or n == "cls_token" for n in ref}
        assert sum(ref.values()) == 13
    assert got == ref


def test_frozen_parameters_of_the_reduction_follow_the_same_rule():
    model = FATRViT(**BASE, frozen_exclude=["omega"], reduction=dict(method="fatr", layers=(1,)))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["blocks.1.attn.omega1", "blocks.2.attn.omega1"]


def test_pretrained_becomes_init_cfg():
    model = FATRViT(**BASE, pretrained="https://example.org/vit.pth")
    assert model.init_cfg == dict(type="Pretrained", checkpoint="https://example.org/vit.pth")
    # The segmentor-level ``pretrained`` of mmseg's zoo configs reaches the backbone this way.
    segmentor = MODELS.build(dict(
        type="EncoderDecoder", pretrained="pretrain/vit.pth",
        backbone=ConfigDict(type="FATRViT", **BASE),
        decode_head=dict(type="FCNHead", in_channels=32, channels=32, num_convs=0,
                         concat_input=False, num_classes=3)))  # fmt: skip
    assert segmentor.backbone.init_cfg == dict(type="Pretrained", checkpoint="pretrain/vit.pth")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pretrained="a.pth", init_cfg=dict(type="Pretrained", checkpoint="b.pth")),
         "pretrained or init_cfg"),
        (dict(pretrained=3), r"pretrained=3 is invalid"),
        (dict(norm_cfg=dict(type="BN")), r"norm_cfg=.*'BN'.*LayerNorms.*type='LN'"),
        (dict(norm_cfg=dict(type="LN", elementwise_affine=False)),
         r"norm_cfg has unsupported key\(s\) \['elementwise_affine'\]"),
        (dict(act_cfg=dict(type="PReLU")), r"act_cfg=.*PReLU.*\('GELU', 'ReLU', 'SiLU'\)"),
        (dict(act_cfg=dict(type="GELU", slope=2)), r"act_cfg=.*slope.* is invalid"),
        (dict(num_fcs=3), r"num_fcs=3 .*2 layers"),
        (dict(with_cls_token=False, reduction=dict(method="fatr", layers=(2,))),
         r"with_cls_token=False .* reduction=None"),
        (dict(with_cls_token=False, output_cls_token=True),
         "output_cls_token=True needs with_cls_token=True"),
        (dict(output_cls_token=True, compact_output=True),
         "output_cls_token=True needs compact_output=False"),
        (dict(interpolate_mode="linear"), r"interpolate_mode='linear' is invalid.*bicubic"),
        (dict(patch_pad="valid"), r"patch_pad='valid' is invalid.*'corner', 'same'"),
        (dict(attn_drop_rate=1.0), r"attn_drop_rate=1.0 is invalid"),
        (dict(frozen_exclude="all"), r"frozen_exclude='all' is invalid.*\['all'\]"),
        (dict(out_indices=3), r"out_indices=\(3,\) out of range for 3 layers"),
    ],
)  # fmt: skip
def test_arguments_it_cannot_honour_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MODELS.build(dict(type="FATRViT", **BASE, **kwargs))


def test_reduced_backbone_trains_with_every_mmseg_option():
    """attn_drop_rate, with_cp, pre/patch norm and output_cls_token together with a reduction."""
    model = FATRViT(**BASE, attn_drop_rate=0.2, drop_rate=0.1, drop_path_rate=0.1, with_cp=True,
                    pre_norm=True, patch_norm=True, final_norm=True, output_cls_token=True,
                    out_indices=(1, 2), reduction=dict(method="fatr_paper", layers=(1, 2),
                                                       windows=(2, 1)))  # fmt: skip
    model.train()
    outs = model(torch.randn(2, 3, 48, 40))
    assert [tuple(t.shape) for t in flat(outs)] == [(2, 32, 6, 5), (2, 32)] * 2
    sum(t.square().mean() for t in flat(outs)).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_nearest_interpolation_works_where_mmseg_fails():
    model = FATRViT(**BASE, interpolate_mode="nearest")
    pos = model.interpolate_pos_embed((5, 4))
    grid = model.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(5, 4), mode="nearest").flatten(2).transpose(1, 2)
    assert_close(pos, torch.cat([model.pos_embed[:, :1], expected], dim=1), rtol=0, atol=0)
    assert model(torch.randn(1, 3, 40, 32))[0].shape == (1, 32, 5, 4)
    with pytest.raises(ValueError, match="align_corners"):  # mmseg passes align_corners=False
        VisionTransformer(**BASE, interpolate_mode="nearest")(torch.randn(1, 3, 40, 32))
