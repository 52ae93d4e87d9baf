"""Host synchronisations in the forward pass, counted on CPU: there are none.

On CUDA every read of a tensor value on the host (``bool(t)``, ``t.item()``, ``t.tolist()``)
stalls the launch queue until the GPU catches up, and under ``torch.compile`` it breaks the graph.
They all go through the ATen op ``_local_scalar_dense``, which a dispatch mode can count on CPU as
well; data-dependent shapes (``nonzero``, ``masked_select``, ``unique``) sync the same way.

The finite-input check is an asynchronous assert; whether a key bias is needed (empty DC windows,
merged tokens) and whether the compact head needs one depend on the state's structure, not on
tensor values; token budgets come from shapes.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fatr_seg.layers import PRESETS, FATRVisionTransformer
from fatr_seg.ops import init_state

pytestmark = pytest.mark.usefixtures("single_thread")

SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item")


class CountHostSyncs(TorchDispatchMode):
    """Counts the ATen calls that need a tensor's value on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(op in name for op in SYNC_OPS):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def count_syncs(fn) -> list[str]:
    with CountHostSyncs() as counter:
        fn()
    return counter.calls


def build(reduction, check_finite=True, compact_output=False, layers=12):
    torch.manual_seed(0)
    return FATRVisionTransformer(
        img_size=64, patch_size=8, embed_dims=48, num_layers=layers, num_heads=3,
        reduction=reduction, check_finite=check_finite, compact_output=compact_output,
    ).eval()  # fmt: skip


def test_the_probe_counts_a_host_read():
    """The counter is not blind: ``bool(t)`` and ``t.item()`` are counted."""
    t = torch.ones(3)
    assert len(count_syncs(lambda: (bool(t.all()), t.sum().item()))) == 2
    assert count_syncs(lambda: t * 2) == []


@pytest.mark.parametrize("method", sorted(PRESETS))
@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("compact_output", [False, True])
def test_no_host_read_in_the_forward(method, check_finite, compact_output):
    model = build(dict(method=method), check_finite, compact_output)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        calls = count_syncs(lambda: model(x))
        traces = model.reduction_trace(x)
    assert traces and calls == [], calls


@pytest.mark.parametrize("method", ["fatr", "fatr_paper"])
def test_training_step_reads_nothing(method):
    """Backward through the reduction (gather, scatter_add, fused attention) reads nothing."""
    model = build(dict(method=method), check_finite=True).train()
    x = torch.randn(2, 3, 64, 64)
    assert count_syncs(lambda: model(x)[0].square().mean().backward()) == []


def test_plain_vit_reads_nothing():
    model = build(None)
    with torch.no_grad():
        assert count_syncs(lambda: model(torch.randn(1, 3, 64, 64))) == []


def test_empty_windows_cost_no_read():
    """With empty DC windows (masked in every later block) there is still no read."""
    red = dict(method="fatr_paper", layers=(2, 3), keep_ratio=(0.95, 0.9), windows=(4, 4))
    model = build(red, False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        calls = count_syncs(lambda: model(x))
        _, state = model.forward_tokens(x, out_indices=(11,))[0]
    # 64 patches, keep 61 then 55: at most 9 folded, so most of the 16 windows are empty.
    assert (state.dc_count == 0).sum(dim=1).min() >= 7
    assert calls == [], calls


def test_non_finite_input_is_still_rejected_with_a_value_error():
    model = build(dict(method="fatr"))
    x = torch.randn(1, 3, 64, 64)
    x[0, 1, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(x)
    model.check_finite = False
    with torch.no_grad():
        assert model(x)[0].isnan().any()


def test_key_bias_depends_on_structure_not_values():
    state = init_state(1, (2, 2), torch.device("cpu"))
    assert state.key_bias() is None  # no DC, no sizes
    full = state.replace(dc_count=torch.tensor([[1.0, 2.0]]))
    assert full.key_bias()[0, -2:].tolist() == [0.0, 0.0]  # DC tokens: always a bias
    empty = state.replace(dc_count=torch.tensor([[1.0, 0.0]]))
    assert empty.key_bias()[0, -2:].tolist() == [0.0, float("-inf")]
