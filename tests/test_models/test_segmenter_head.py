"""FATRSegmenterHead against mmseg's SegmenterMaskTransformerHead, on full grids and compact tokens.

The reference is mmseg's own head with the same parameters, fed the backbone's restored grid. In
float64 the fused, key-biased path must agree to round-off: folded patches are exact copies of
their DC token, so running the head once per token with a ``log(count)`` key bias is the same
computation as running it on every copy.
"""

import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmseg.models.decode_heads import FCNHead, SegmenterMaskTransformerHead
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules

from fatr_seg.layers import CompactTokens
from fatr_seg.models import FATRSegmenterHead, FATRViT
from fatr_seg.models.preflight import PreflightError, check_model

register_all_modules()
EMBED, HEADS, CLASSES = 48, 3, 5
F64 = dict(rtol=1e-9, atol=1e-10)

REDUCTIONS = {
    "fatr": dict(method="fatr", layers=(2, 4, 6), keep_ratio=0.6, windows=(2, 2, 1)),
    "fatr_proxy": dict(
        method="fatr", layers=(2, 4), keep_ratio=0.5, windows=(3, 1), score="logit_proxy"
    ),  # fmt: skip
    "random": dict(method="random", layers=(3, 5), keep_ratio=0.5, windows=(2, 1)),
    "evit": dict(method="evit", layers=(2, 4, 6), keep_ratio=0.6),
    "tome": dict(method="tome", layers=(2, 4, 6), keep_ratio=0.6),
    "merge": dict(method="fatr", layers=(2, 4, 6), keep_ratio=0.6),
    "algm": dict(method="algm", layers=(1, 4), keep_ratio=0.65),
}


def head_kwargs(**kw):
    return dict(in_channels=EMBED, channels=EMBED, num_classes=CLASSES, num_layers=2,
                num_heads=HEADS, embed_dims=EMBED, dropout_ratio=0.0, drop_path_rate=0.0,
                **kw)  # fmt: skip


def heads(seed=0):
    """(stock, ours) with identical, non-trivial float64 parameters."""
    torch.manual_seed(seed)
    stock = SegmenterMaskTransformerHead(**head_kwargs())
    stock.init_weights()
    with torch.no_grad():
        for p in stock.parameters():  # away from the init's zeros and ones
            p.add_(0.1 * torch.randn_like(p))
    ours = FATRSegmenterHead(**head_kwargs())
    ours.load_state_dict(stock.state_dict(), strict=True)
    return stock.double().eval(), ours.double().eval()


def backbones(reduction, seed=0):
    torch.manual_seed(seed)
    kw = dict(img_size=64, patch_size=8, embed_dims=EMBED, num_layers=8, num_heads=HEADS,
              reduction=reduction)  # fmt: skip
    full = FATRViT(**kw)
    compact = FATRViT(compact_output=True, **kw)
    compact.load_state_dict(full.state_dict())
    return full.double().eval(), compact.double().eval()


def images(B, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, *size, generator=g, dtype=torch.float64)


def test_same_parameters_as_mmseg_head():
    stock, ours = heads()
    assert list(stock.state_dict()) == list(ours.state_dict())


@pytest.mark.parametrize("size", [(8, 8), (5, 9)])
def test_full_grid_matches_mmseg_head(size):
    stock, ours = heads()
    x = torch.randn(2, EMBED, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours([x]), stock([x]), **F64)


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@pytest.mark.parametrize("size", [(64, 64), (56, 80)])
def test_compact_tokens_match_mmseg_head_on_restored_grid(name, size):
    stock, ours = heads()
    full, compact = backbones(REDUCTIONS[name])
    x = images(2, size)
    with torch.no_grad():
        torch.manual_seed(1)  # the random reducer draws its keep set from the global RNG
        grid = full(x)
        torch.manual_seed(1)
        tokens = compact(x)
        assert isinstance(tokens[0], CompactTokens)
        assert tokens[0].tokens.shape[1] < grid[0].shape[2] * grid[0].shape[3]
        torch.testing.assert_close(tokens[0].restore(), grid[0], rtol=0, atol=0)
        logits = ours(tokens)
        torch.testing.assert_close(logits, stock(grid), **F64)
        # Contiguous, as mmseg's head returns them: the resize to the image size that follows
        # is several times slower on the channels-last view of the per-token masks.
        assert logits.is_contiguous() and ours([grid[0]]).is_contiguous()


def test_counts_cover_the_grid_and_empty_windows_are_masked():
    # 7x10 grid with 3x3 DC windows and a keep ratio near 1: some windows receive no patch.
    red = dict(method="fatr", layers=(2,), keep_ratio=0.95, windows=(3,))
    stock, ours = heads()
    full, compact = backbones(red)
    x = images(3, (56, 80), seed=1)
    with torch.no_grad():
        out = compact(x)[0]
        N = 7 * 10
        total = torch.full((3,), float(N), dtype=torch.float64)
        torch.testing.assert_close(out.counts.sum(1), total)
        assert bool((out.counts == 0).any()), "the case needs an empty DC window"
        bias = out.key_bias()
        assert torch.isneginf(bias[out.counts == 0]).all()
        torch.testing.assert_close(ours((out,)), stock(full(x)), **F64)


def test_unreduced_compact_output_needs_no_bias():
    stock, ours = heads()
    full, compact = backbones(None)
    x = images(2, (64, 48))
    with torch.no_grad():
        out = compact(x)[0]
        assert out.key_bias() is None
        torch.testing.assert_close(ours((out,)), stock(full(x)), **F64)


def test_gradients_match_the_restored_path():
    stock, ours = heads()
    full, compact = backbones(REDUCTIONS["fatr"])
    x = images(2, (64, 64))
    target = torch.randn(2, CLASSES, 8, 8, dtype=torch.float64)
    for m in (stock, ours, full, compact):
        m.train()
    (stock(full(x)) * target).sum().backward()
    (ours(compact(x)) * target).sum().backward()
    for (name, a), (_, b) in zip(full.named_parameters(), compact.named_parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, name
            continue
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-11, msg=name)
    for (name, a), (_, b) in zip(stock.named_parameters(), ours.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-11, msg=name)


def test_float32_compact_path_close_to_stock_head():
    stock, ours = heads()
    full, compact = backbones(REDUCTIONS["fatr"])
    stock, ours, full, compact = (m.float() for m in (stock, ours, full, compact))
    x = images(2, (64, 64)).float()
    with torch.no_grad():
        ref = stock(full(x))
        torch.testing.assert_close(ours(compact(x)), ref, rtol=1e-4, atol=1e-4)


def test_stock_head_on_compact_output_says_what_to_do():
    _, compact = backbones(REDUCTIONS["fatr"])
    head = FCNHead(in_channels=EMBED, channels=EMBED, num_convs=0, concat_input=False,
                   num_classes=CLASSES).double()  # fmt: skip
    with torch.no_grad():
        out = compact(images(1, (64, 64)))
    with pytest.raises(TypeError, match="compact_output=False"):
        head(out)
    # Probes for tensor attributes (hasattr, getattr with a default) get a plain "no".
    assert not hasattr(out[0], "shape") and getattr(out[0], "dim", None) is None


def test_compact_output_rejects_residual_restore():
    red = dict(REDUCTIONS["fatr"], restore="residual")
    with pytest.raises(ValueError, match="compact_output=True needs reduction restore='copy'"):
        FATRViT(img_size=64, patch_size=8, embed_dims=EMBED, num_layers=8, num_heads=HEADS,
                reduction=red, compact_output=True)  # fmt: skip


def _cfg(head_type, **model):
    return Config(dict(model=dict(backbone=dict(type="FATRViT", compact_output=True),
                                  decode_head=dict(type=head_type), **model)))  # fmt: skip


def test_preflight_names_the_head_that_cannot_read_compact_tokens():
    check_model(_cfg("FATRSegmenterHead"))
    with pytest.raises(PreflightError, match="decode_head type 'FCNHead'"):
        check_model(_cfg("FCNHead"))
    with pytest.raises(PreflightError, match="neck 'MultiLevelNeck'"):
        check_model(_cfg("FATRSegmenterHead", neck=dict(type="MultiLevelNeck")))
    with pytest.raises(PreflightError, match="auxiliary_head"):
        check_model(_cfg("FATRSegmenterHead", auxiliary_head=dict(type="FCNHead")))
    ok = _cfg("FCNHead")
    ok.model.backbone.compact_output = False
    check_model(ok)


def test_segmentor_trains_and_predicts_with_compact_head():
    cfg = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3),
        backbone=dict(type="FATRViT", img_size=64, patch_size=8, embed_dims=EMBED, num_layers=8,
                      num_heads=HEADS, reduction=REDUCTIONS["fatr"], compact_output=True),
        decode_head=dict(type="FATRSegmenterHead", loss_decode=dict(type="CrossEntropyLoss"),
                         **head_kwargs()),
        test_cfg=ConfigDict(mode="whole"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    x = torch.randn(2, 3, 64, 64)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for i in range(2):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, CLASSES, (1, 64, 64)))
        s.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(s)
        del i
    losses = model.loss(x, samples)
    losses["decode.loss_ce"].backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        pred = model.predict(x, samples)
    assert pred[0].pred_sem_seg.data.shape == (1, 64, 64)
