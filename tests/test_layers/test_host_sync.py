"""Host synchronisations in the forward pass, counted on CPU.

On CUDA every read of a tensor value on the host (``bool(t)``, ``t.item()``, ``t.tolist()``)
stalls the launch queue until the GPU catches up. They all go through the ATen op
``_local_scalar_dense``, which a dispatch mode can count on CPU as well; data-dependent shapes
(``nonzero``, ``masked_select``, ``unique``) sync the same way.

The forward pays one read for the finite-input check and one per reduction layer that folds
tokens (whether a DC window is empty decides the key bias of every later block). Before the
flag ``TokenState.has_empty_dc`` it paid one in every block after the first reduction.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fatr_seg.layers import FATRVisionTransformer
from fatr_seg.ops import init_state

pytestmark = pytest.mark.usefixtures("single_thread")

SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique")


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


RED = dict(layers=(4, 7, 10), keep_ratio=0.7, windows=(2, 2, 1))


def test_the_probe_counts_a_host_read():
    """The counter is not blind: ``bool(t)`` and ``t.item()`` are counted."""
    t = torch.ones(3)
    assert len(count_syncs(lambda: (bool(t.all()), t.sum().item()))) == 2
    assert count_syncs(lambda: t * 2) == []


@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("compact_output", [False, True])
def test_one_host_read_per_reduction_layer(check_finite, compact_output):
    model = build(RED, check_finite, compact_output)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        calls = count_syncs(lambda: model(x))
    assert len(calls) == len(RED["layers"]) + int(check_finite), calls


def test_training_step_adds_no_host_read():
    """Backward through the reduction (gather, scatter_add, fused attention) reads nothing."""
    model = build(RED, check_finite=False).train()
    x = torch.randn(2, 3, 64, 64)
    calls = count_syncs(lambda: model(x)[0].square().mean().backward())
    assert len(calls) == len(RED["layers"]), calls


def test_plain_vit_reads_only_the_finite_check():
    model = build(None)
    with torch.no_grad():
        assert len(count_syncs(lambda: model(torch.randn(1, 3, 64, 64)))) == 1


def test_empty_windows_cost_no_extra_read():
    """With empty DC windows (a bias on every later block) the count is the same."""
    model = build(dict(layers=(2, 3), keep_ratio=(0.95, 0.9), windows=(4, 4)), False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        traces = model.reduction_trace(x)
        calls = count_syncs(lambda: model(x))
    # 64 patches, keep 61 then 55: at most 9 folded, so most of the 16 windows are empty.
    assert (traces[-1].lf_window >= 0).sum(dim=1).max() <= 9
    assert len(calls) == 2, calls


def test_flag_unknown_reads_counts_and_replace_resets_it():
    state = init_state(1, (2, 2), torch.device("cpu"))
    counts = torch.tensor([[1.0, 0.0]])
    state = state.replace(dc_count=counts, has_empty_dc=False)
    assert state.key_bias() is None  # trusts the flag
    state = state.replace(dc_count=counts)  # new counts, no flag: unknown again
    assert state.has_empty_dc is None
    bias = state.key_bias()
    assert bias[0, -2:].tolist() == [0.0, float("-inf")]
