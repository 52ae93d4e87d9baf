"""Attention dropout (``attn_drop_rate``) on the fused kernel and on the reweighted path.

On CPU, ``F.scaled_dot_product_attention`` with ``dropout_p > 0`` draws its mask as
``F.dropout`` does on the (B, h, n, n) attention matrix, so with the same seed the explicit
reference below sees the same dropped matrix ``Ã``. FATR's reweighted attention must then equal
``(A_LP + c_hp (Ã - A_LP) + c_dc Ã_DC) V`` exactly: its one-hot call reads ``Ã[:, DC]`` from the
same dropped matrix as ``Ã V``.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from fatr_seg.layers import Attention
from fatr_seg.ops import attention, attention_with_lse, reweighted_attention

DT = torch.float64
B, H, N, D = 2, 3, 11, 8
SCALE = D**-0.5
P = 0.3


def qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=gen, dtype=DT) for _ in range(3)]


def key_bias(num_dc):
    """Empty last DC window (-inf) and proportional-attention biases on two patch tokens."""
    bias = torch.zeros(B, N, dtype=DT)
    bias[:, -1] = float("-inf")
    bias[:, 2:4] = torch.tensor([0.7, 1.1], dtype=DT)
    return bias if num_dc else None


def dropped_matrix(q, k, bias, seed):
    """The explicit ``Ã``: softmax, then ``F.dropout`` drawn from the same seed."""
    logits = q @ k.transpose(-2, -1) * SCALE
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    torch.manual_seed(seed)
    return F.dropout(logits.softmax(-1), P)


@pytest.mark.parametrize("fused", [True, False])
def test_plain_attention_drops_the_attention_matrix(fused):
    q, k, v = qkv()
    torch.manual_seed(7)
    out = attention(q, k, v, SCALE, fused=fused, dropout_p=P)
    assert_close(out, dropped_matrix(q, k, None, 7) @ v, rtol=1e-12, atol=1e-12)
    torch.manual_seed(7)
    out_lse, lse = attention_with_lse(q, k, v, SCALE, fused=fused, dropout_p=P)
    assert lse is None  # the CPU flash kernel has no dropout: no log-sum-exp to reuse
    assert_close(out_lse, out, rtol=0, atol=0)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("num_dc", [0, 3])
@pytest.mark.parametrize("fused", [True, False])
def test_reweighted_attention_sees_the_same_dropped_matrix(fused, num_dc, grad):
    q, k, v = qkv(1)
    c_hp = torch.tensor([1.0, 1.6, 0.4], dtype=DT, requires_grad=grad)
    c_dc = torch.tensor([0.3, 1.0, 2.0], dtype=DT, requires_grad=grad)
    bias = key_bias(num_dc)
    with torch.set_grad_enabled(grad):
        torch.manual_seed(11)
        out, _ = reweighted_attention(q, k, v, SCALE, num_dc, c_hp, c_dc, bias, fused, P)
    a = dropped_matrix(q, k, bias, 11)
    valid = torch.ones(B, N, dtype=DT) if bias is None else torch.isfinite(bias).to(DT)
    a_lp = (valid / valid.sum(1, keepdim=True))[:, None, None, :]
    dc_cols = torch.zeros(N, dtype=DT)
    if num_dc:
        dc_cols[-num_dc:] = 1.0
    c_hp_, c_dc_ = c_hp.detach().view(1, H, 1, 1), c_dc.detach().view(1, H, 1, 1)
    expected = (a_lp + c_hp_ * (a - a_lp) + c_dc_ * a * dc_cols) @ v
    assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if grad:  # gradients reach the coefficients through the dropped matrix
        out.sum().backward()
        assert c_hp.grad is not None and (num_dc == 0 or c_dc.grad.abs().sum() > 0)


def test_attention_module_drops_only_in_training():
    torch.manual_seed(0)
    attn = Attention(16, 2, attn_drop=0.5).double()
    x = torch.randn(2, 9, 16, dtype=DT)
    attn.eval()
    plain, _ = attn(x)
    attn.attn_drop = 0.0
    attn.train()
    assert_close(attn(x)[0], plain, rtol=0, atol=0)
    attn.attn_drop = 0.5
    torch.manual_seed(1)
    dropped, _ = attn(x)
    assert not torch.allclose(dropped, plain)
    # The same seed, the same mask; a reweighted module with omega = 0 is plain attention.
    rew = Attention(16, 2, attn_drop=0.5, reweight="identity", dc_terms=True).double()
    rew.load_state_dict(attn.state_dict(), strict=False)
    rew.train()
    torch.manual_seed(1)
    assert_close(rew(x, num_dc=2)[0], dropped, rtol=1e-12, atol=1e-12)


def test_attn_drop_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"attn_drop=1\.0 is invalid"):
        Attention(16, 2, attn_drop=1.0)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]  # fmt: skip


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("device", DEVICES)
def test_dc_columns_come_from_the_same_dropped_call(device, grad):
    """Device-agnostic (CUDA kernels draw masks their own way): with V zero outside the DC rows,
    ``Ã V`` is ``Ã[:, DC] V[DC]``, so ``c_dc = 1`` must exactly double the output, which holds
    only if both terms saw the same dropped matrix."""
    dtype = torch.float32 if device == "cuda" else DT
    q, k, v = (t.to(device, dtype) for t in qkv(2))
    num_dc = 3
    v[:, :, : N - num_dc] = 0
    c_hp = torch.ones(H, device=device, dtype=dtype)
    outs = []
    for c in (0.0, 1.0):
        torch.manual_seed(5)
        if device == "cuda":
            torch.cuda.manual_seed(5)
        c_dc = torch.full((H,), c, device=device, dtype=dtype, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            out, _ = reweighted_attention(q, k, v, SCALE, num_dc, c_hp, c_dc, None, True, P)
        outs.append(out.detach())
    assert outs[0].abs().sum() > 0
    assert_close(outs[1], 2 * outs[0], rtol=1e-5, atol=1e-6)
