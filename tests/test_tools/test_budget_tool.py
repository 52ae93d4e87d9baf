"""Equal-MACs budgets (:mod:`fatr_seg.analysis.budget`): the bisection against a brute-force
search, and every preset matched to FATR's MACs on the CamVid ViT-Ti, checked by counting."""

import math

import pytest
import torch

from fatr_seg.analysis import count_macs
from fatr_seg.analysis.budget import ViTShape, bisect_budget, match_budget, with_budget
from fatr_seg.layers.config import PRESETS
from fatr_seg.layers.vit import FATRVisionTransformer

# The CamVid study's model and input: ViT-Ti/16 on 368x480 (23x30 patches).
TI = ViTShape((23, 30), 192, 12, 16, 3)


def brute_force(macs_of, target, candidates):
    """The smallest |MACs - target| over every candidate budget."""
    return min(abs(macs_of(v) - target) for v in candidates)


@pytest.mark.parametrize("rising", [True, False])
def test_bisect_real_budget_finds_the_closest_step(rising):
    # A piecewise-constant monotone cost, like token counts: 1000 per step of 1/37.
    def macs_of(x):
        steps = math.ceil(x * 37)
        return 1000 * (steps if rising else 40 - steps) + 5000

    grid = [0.2 + i * 1e-4 for i in range(8001)]
    for target in (12345, 12800, 30010, 26900, 38000):  # closest step below or above
        value, macs = bisect_budget(macs_of, target, 0.2, 1.0, tol=0.5)
        assert macs == macs_of(value) and 0.2 <= value <= 1.0
        assert abs(macs - target) == brute_force(macs_of, target, grid)


def test_bisect_integer_budget_finds_the_closest_count():
    def macs_of(r):  # falls with r, like ToMe's constant schedule
        return 10_000 - 7 * r * r

    for target in (10_000, 9_000, 5_432, 3_100):
        value, macs = bisect_budget(macs_of, target, 0, 30, integer=True, tol=0.5)
        assert isinstance(value, int) and macs == macs_of(value)
        assert abs(macs - target) == brute_force(macs_of, target, range(31))


def test_bisect_out_of_reach_names_the_range():
    with pytest.raises(ValueError, match=r"method 'x': 0\.0000 GMACs is outside .*\[0\.5, 1\.0\]"):
        bisect_budget(lambda x: int(1e9 * x), 10, 0.5, 1.0, what="method 'x'")
    # Within range, but no step close enough.
    with pytest.raises(ValueError, match="no budget in .* comes within 1%.*closest"):
        bisect_budget(lambda x: 1000 if x < 0.7 else 2000, 1500, 0.5, 1.0)


def test_with_budget_replaces_either_budget():
    assert with_budget(dict(method="tome_constant", r=16), "r", 36.0) == dict(
        method="tome_constant", r=36
    )
    assert with_budget(dict(method="algm", keep_ratio=(0.7, 0.7)), "keep_ratio", 0.8) == dict(
        method="algm", keep_ratio=0.8
    )


def test_every_preset_matches_fatr_macs_as_counted(single_thread):
    """The matched budgets of every peer are within 1 % of FATR's MACs, by the closed form and
    by counting the real model's forward (the closed form's own check)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 368, 480)
    ref = dict(method="fatr")
    target = TI.macs(ref)

    def counted(red):
        vit = FATRVisionTransformer(img_size=256, embed_dims=192, num_heads=3, reduction=red)
        return count_macs(vit.eval(), x).macs

    ref_counted = counted(ref)
    assert ref_counted == target
    for method in PRESETS:
        b = match_budget(dict(method=method), target, TI, tol=0.01)
        assert abs(b.rel_error) <= 0.01 and b.macs == TI.macs(b.reduction)
        assert abs(counted(b.reduction) / ref_counted - 1) <= 0.01, method
        if method == "fatr":
            assert b.reduction == dict(method="fatr", keep_ratio=0.7)
        if method == "tome_constant":  # the best integer r: no other r is closer
            assert b.key == "r" and isinstance(b.value, int)
            red = b.reduction
            assert abs(b.macs - target) == brute_force(
                lambda r, red=red: TI.macs(with_budget(red, "r", r)), target, range(0, 120)
            )


def test_match_budget_refuses_an_unreachable_target():
    # ToMe cannot merge more than half the tokens of a layer: a tenth of FATR's MACs is too low.
    with pytest.raises(ValueError, match="method 'tome', keep_ratio: .* is outside"):
        match_budget(dict(method="tome"), TI.macs(dict(method="fatr")) // 10, TI)
