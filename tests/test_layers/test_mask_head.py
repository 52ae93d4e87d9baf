"""The pure-torch Segmenter head: mmseg's weights load strictly and give mmseg's logits."""

import pytest
import torch
from mmseg.models.decode_heads import SegmenterMaskTransformerHead
from torch.testing import assert_close

from fatr_seg.layers import FATRVisionTransformer, MaskTransformerHead
from fatr_seg.models import FATRSegmenterHead

pytestmark = pytest.mark.usefixtures("single_thread")
ARGS = dict(in_channels=32, num_classes=7, num_layers=2, num_heads=2, embed_dims=32)


def mmseg_head(cls=SegmenterMaskTransformerHead):
    torch.manual_seed(0)
    head = cls(channels=32, dropout_ratio=0.0, **ARGS).eval()
    with torch.no_grad():  # away from LayerNorm's ones/zeros init, so every weight matters
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return head


def pure_head(source):
    head = MaskTransformerHead(**ARGS).eval()
    head.load_state_dict(source.state_dict(), strict=True)
    return head


def test_mmseg_state_dict_loads_strictly_and_gives_mmsegs_logits():
    ref = mmseg_head()
    head = pure_head(ref)
    assert head.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 32, 5, 7)
    with torch.no_grad():
        assert_close(head([x]), ref([x]), rtol=1e-5, atol=1e-5)  # mmseg's explicit softmax


@pytest.mark.parametrize("method", ["fatr", "fatr_paper", "tome"])
def test_compact_tokens_give_the_fatr_heads_logits(method):
    """On the reduced token set: FATRSegmenterHead's logits, and the full grid's."""
    fatr_head = mmseg_head(FATRSegmenterHead)
    head = pure_head(fatr_head)
    torch.manual_seed(1)
    vit = FATRVisionTransformer(img_size=64, patch_size=8, embed_dims=32, num_layers=3,
                                num_heads=2, reduction=dict(method=method, layers=(1, 2, 3)),
                                compact_output=True).eval()  # fmt: skip
    with torch.no_grad():
        (compact,) = vit(torch.randn(2, 3, 64, 72))
        got = head((compact,))
        assert got.shape == (2, 7, 8, 9)
        assert_close(got, fatr_head((compact,)), rtol=0, atol=0)  # the same code
        assert_close(got, head([compact.restore()]), rtol=1e-5, atol=1e-5)
