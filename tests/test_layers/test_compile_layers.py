"""``torch.compile(backbone, fullgraph=True)`` with inductor on CPU: one graph, eager's results.

Every reduction preset (and ``reduction=None``) compiles as ONE graph (``fullgraph=True`` raises on
any graph break; a counting backend checks that the backend really compiled it, so a silent eager
fallback cannot pass), at a fixed input size, and gives eager's tokens to float tolerance and
eager's token selection exactly (the source map of every grid position); a non-finite input is
still rejected (as a RuntimeError with the eager ValueError's message). Inductor compiles C++
per kernel, about a minute per model on the 2-core machine, so it runs for one preset of each kind
of aggregation (``INDUCTOR``) and the rest go through AOTAutograd only.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fatr_seg.layers import PRESETS, FATRVisionTransformer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

# The presets on a 3-block model: reduction layers renumbered to fit, per-layer values kept.
TINY_LAYERS = {"algm": (1, 3), "tome_constant": (1, 2, 3)}


def tiny_reduction(method):
    if method is None:
        return None
    red = dict(method=method, layers=TINY_LAYERS.get(method, (1, 2, 3)))
    if method == "tome_constant":
        red["r"] = 8  # of 64 patches per layer; ToMe's 16 would hit its half-the-tokens cap
    return red


def build(reduction, compact_output=True):
    torch.manual_seed(0)
    model = FATRVisionTransformer(
        img_size=64, patch_size=8, embed_dims=32, num_layers=3, num_heads=2,
        reduction=reduction, compact_output=compact_output,
    ).eval()  # fmt: skip
    with torch.no_grad():  # ω and DC terms away from their identity init, so they matter
        for name, p in model.named_parameters():
            if name.endswith(("omega1", "omega2", "dc_pos")):
                p.normal_(0, 0.3)
    return model


def compiled(fn, backend="inductor"):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True, dynamic=False), counter


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_same_compact(eager, comp):
    for a, b in zip(eager, comp, strict=True):
        assert torch.equal(a.source, b.source)  # the same token selection, position by position
        assert torch.equal(a.counts, b.counts)
        assert a.num_dc == b.num_dc and a.hw_shape == b.hw_shape
        torch.testing.assert_close(b.tokens, a.tokens, rtol=1e-5, atol=1e-5)


# Inductor for every kind of aggregation (merge, EViT's fused token, ALGM's local windows; the
# DC windows of fatr_paper in test_restored_residual_output_matches_eager) and the unreduced
# model; the other presets use the same ops with another score, schedule or restore, and run
# through AOTAutograd without inductor's code generation (seconds, not a minute): one graph,
# eager's selection, each.
INDUCTOR = ("fatr", "evit", "algm", None)


@pytest.mark.parametrize("method", [*sorted(PRESETS), None])
def test_backbone_compiles_to_one_graph_and_matches_eager(method):
    model = build(tiny_reduction(method))
    fn, counter = compiled(model, "inductor" if method in INDUCTOR else "aot_eager")
    # 'random' draws its keep set from torch's generator; inductor has its own generator unless
    # told to fall back to torch's, which makes the compiled draw equal eager's.
    with torch._inductor.config.patch(fallback_random=method == "random"), torch.no_grad():
        for seed in (0, 1):  # a second input of the same size reuses the graph
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
            torch.manual_seed(seed)
            eager = model(x)
            torch.manual_seed(seed)
            assert_same_compact(eager, fn(x))
        if method == "fatr":  # the asynchronous finite check survives compilation
            x[0, 2, 3, 4] = float("inf")
            with pytest.raises(RuntimeError, match="NaN or Inf"):
                fn(x)
    assert counter.frame_count == 1 and counter.op_count > 0


def test_local_stage_on_a_grid_its_windows_do_not_tile():
    """A 7x9 grid: its last row and column are in no 2x2 window (the plan's other path)."""
    model = build(tiny_reduction("fatr_local"))
    fn, counter = compiled(model, "aot_eager")
    x = torch.randn(2, 3, 56, 72, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_same_compact(model(x), fn(x))
    assert counter.frame_count == 1


def test_restored_residual_output_matches_eager():
    """Full-grid output with ``restore='residual'`` (the restorer's other path), odd image size."""
    red = dict(method="fatr_paper", layers=(1, 2, 3), restore="residual")
    model = build(red, compact_output=False)
    model.out_indices = (1, 2)
    fn, counter = compiled(model)
    x = torch.randn(2, 3, 56, 72)
    with torch.no_grad():
        for a, b in zip(model(x), fn(x), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
