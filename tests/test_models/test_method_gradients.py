"""Every parameter of every reduction method gets a gradient in one training step.

mmseg trains with DDP and ``find_unused_parameters=False`` by default: a parameter that a method
never uses (no gradient after ``backward``) stops the second iteration. One training step of a
tiny 12-block Segmenter (64 patch tokens, so every preset keeps its own layers and budgets)
for every preset, and for 'fatr' with ``restore='residual'`` and with ``compact_output``.
"""

import pytest
import torch
from mmengine.config import ConfigDict
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
from seg_batch import seg_batch

import fatr_seg.models  # noqa: F401  (registers FATRViT and FATRSegmenterHead)
from fatr_seg.layers.config import PRESETS

register_all_modules()
CLASSES = 5
CASES = {name: dict(reduction=dict(method=name)) for name in PRESETS}
CASES["fatr_residual"] = dict(reduction=dict(method="fatr", restore="residual"))
CASES["fatr_compact"] = dict(reduction=dict(method="fatr"), compact_output=True)
CASES["fatr_paper_compact"] = dict(reduction=dict(method="fatr_paper"), compact_output=True)
# The reduction's own parameters each method has: (omega1, omega2, dc_pos) counts.
OWN = {"fatr": (8, 0, 0), "fatr_local": (10, 0, 0), "fatr_paper": (8, 8, 3), "random": (8, 0, 0)}


def tiny_segmentor(**backbone):
    return MODELS.build(dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[127.5] * 3, std=[127.5] * 3,
                               size=(64, 64)),
        backbone=ConfigDict(type="FATRViT", img_size=64, patch_size=8, embed_dims=32,
                            num_layers=12, num_heads=2, drop_path_rate=0.1, final_norm=True,
                            **backbone),
        decode_head=dict(type="FATRSegmenterHead", in_channels=32, channels=32,
                         num_classes=CLASSES, num_layers=1, num_heads=2, embed_dims=32,
                         dropout_ratio=0.0)))  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_every_parameter_gets_a_finite_gradient(case):
    torch.manual_seed(0)
    model = tiny_segmentor(**CASES[case]).train()
    data = model.data_preprocessor(seg_batch((64, 64), CLASSES), True)
    loss, _ = model.parse_losses(model.loss(data["inputs"], data["data_samples"]))
    loss.backward()
    params = dict(model.named_parameters())
    unused = [n for n, p in params.items() if p.grad is None]
    assert not unused, f"{case}: no gradient for {unused}"
    for n, p in params.items():
        assert torch.isfinite(p.grad).all(), n
    own = tuple(sum(n.endswith(s) for n in params) for s in ("omega1", "omega2", "dc_pos"))
    method = CASES[case]["reduction"]["method"]
    assert own == OWN.get(method, (0, 0, 0))  # peers have none: no FATR reweighting
