"""Attention on fused kernels and the exact reweighting identity, against explicit references."""

import pytest
import reference as ref
import torch
from torch.testing import assert_close

from fatr_seg.layers import Attention
from fatr_seg.ops.attention import (
    attention,
    attention_with_lse,
    fused_attn_default,
    reweighted_attention,
)

NEG_INF = float("-inf")
pytestmark = pytest.mark.usefixtures("single_thread")


def make_qkv(B, h, n, d, seed=0, sharpness=1.5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    return (q * sharpness).to(dtype), (k * sharpness).to(dtype), v.to(dtype)


def make_omegas(h, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    return torch.randn(h, generator=gen) * 0.7, torch.randn(h, generator=gen) * 0.7


def dc_key_bias(B, n, num_dc):
    """Mask one DC token (an empty window) in image 0 and another in the last image."""
    if num_dc == 0:
        return None
    bias = torch.zeros(B, n)
    bias[0, n - num_dc] = NEG_INF
    bias[-1, n - 1] = NEG_INF
    return bias


# ---------------------------------------------------------------------------------------------
# Plain attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 53])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_and_explicit_attention_agree_with_reference(n, masked):
    B, h, d = 3, 4, 16
    q, k, v = make_qkv(B, h, n, d, seed=n)
    bias = None
    if masked and n > 1:
        bias = torch.zeros(B, n)
        bias[:, -1] = NEG_INF
        bias[1, 1 : n // 2] = NEG_INF
    expected = ref.attention_matrix(q, k, d**-0.5, bias) @ v.double()

    fused = attention(q, k, v, d**-0.5, bias, fused=True)
    explicit = attention(q, k, v, d**-0.5, bias, fused=False)

    assert fused.shape == (B, h, n, d)
    assert_close(fused.double(), expected, atol=1e-6, rtol=1e-5)
    assert_close(explicit.double(), expected, atol=1e-6, rtol=1e-5)
    assert_close(fused, explicit, atol=1e-6, rtol=1e-5)


def test_attention_with_lse_returns_row_logsumexp():
    B, h, n, d = 2, 3, 29, 8
    q, k, v = make_qkv(B, h, n, d, seed=1)
    bias = torch.zeros(B, n)
    bias[0, -2:] = NEG_INF
    logits = q.double() @ k.double().transpose(-2, -1) * 0.3 + bias.double()[:, None, None, :]

    out, lse = attention_with_lse(q, k, v, 0.3, bias, fused=True)
    out_explicit, lse_explicit = attention_with_lse(q, k, v, 0.3, bias, fused=False)

    assert lse is not None and lse.shape == (B, h, n) and lse.dtype == torch.float32
    assert_close(lse.double(), logits.logsumexp(-1), atol=1e-5, rtol=1e-6)
    assert_close(out.double(), logits.softmax(-1) @ v.double(), atol=1e-6, rtol=1e-5)
    assert lse_explicit is None
    assert_close(out_explicit, out, atol=1e-6, rtol=1e-5)


def test_env_var_switches_default_to_explicit(monkeypatch):
    monkeypatch.delenv("FATR_FUSED_ATTN", raising=False)
    assert fused_attn_default() is True
    assert Attention(16, 2).fused_attn is True
    monkeypatch.setenv("FATR_FUSED_ATTN", "0")
    assert fused_attn_default() is False
    assert Attention(16, 2).fused_attn is False
    assert Attention(16, 2, fused_attn=True).fused_attn is True
    monkeypatch.setenv("FATR_FUSED_ATTN", "1")
    assert fused_attn_default() is True


# ---------------------------------------------------------------------------------------------
# Reweighted attention: Â V = A_LP V + (1 + ω1) A_HP V + (1 + ω2) A_DC V
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [6, 19, 50])
@pytest.mark.parametrize("num_dc", [0, 1, 4])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("grad", [False, True])
def test_reweighted_attention_matches_explicit_hat_a(n, num_dc, masked, fused, grad):
    B, h, d = 3, 3, 8
    q, k, v = make_qkv(B, h, n, d, seed=n + 10 * num_dc)
    omega1, omega2 = make_omegas(h, seed=n)
    bias = dc_key_bias(B, n, num_dc) if masked else None
    expected = ref.reweighted_attention(q, k, v, d**-0.5, num_dc, omega1, omega2, bias)
    if grad:
        q.requires_grad_(True)  # the training path: the one-hot DC indicator through the kernel

    out, lse = reweighted_attention(q, k, v, d**-0.5, num_dc, 1 + omega1, 1 + omega2, bias, fused)

    assert out.shape == (B, h, n, d) and out.dtype == torch.float32
    assert out.requires_grad == grad
    assert_close(out.detach().double(), expected, atol=1e-5, rtol=1e-5)
    if fused:  # the CPU fused kernel exposes the row log-sum-exp of the PLAIN logits
        logits = q.detach().double() @ k.double().transpose(-2, -1) * d**-0.5
        if bias is not None:
            logits = logits + bias.double()[:, None, None, :]
        assert_close(lse.double(), logits.logsumexp(-1), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("num_dc", [1, 4])
def test_grad_and_no_grad_paths_agree(num_dc):
    B, h, n, d = 2, 4, 33, 16
    q, k, v = make_qkv(B, h, n, d, seed=7)
    omega1, omega2 = make_omegas(h, seed=7)
    bias = dc_key_bias(B, n, num_dc)
    with torch.no_grad():
        no_grad, _ = reweighted_attention(q, k, v, d**-0.5, num_dc, 1 + omega1, 1 + omega2, bias)
    with_grad, _ = reweighted_attention(
        q, k, v.requires_grad_(True), d**-0.5, num_dc, 1 + omega1, 1 + omega2, bias
    )
    assert_close(no_grad, with_grad.detach(), atol=1e-6, rtol=1e-5)


def test_masked_dc_token_gets_no_attention_and_leaves_mean():
    """A masked (empty) DC token must behave exactly as if it were absent from the sequence."""
    B, h, n, d, num_dc = 1, 2, 12, 8, 3
    q, k, v = make_qkv(B, h, n, d, seed=3)
    omega1, omega2 = make_omegas(h, seed=3)
    bias = torch.zeros(B, n)
    bias[0, n - 2] = NEG_INF  # the middle DC token is empty
    v_poisoned = v.clone()
    v_poisoned[0, :, n - 2] = 1e4  # whatever it holds must not leak into any output row
    keep = [i for i in range(n) if i != n - 2]

    out, _ = reweighted_attention(q, k, v_poisoned, d**-0.5, num_dc, 1 + omega1, 1 + omega2, bias)
    absent, _ = reweighted_attention(
        q[:, :, keep], k[:, :, keep], v[:, :, keep], d**-0.5, num_dc - 1, 1 + omega1, 1 + omega2
    )
    assert_close(out[:, :, keep], absent, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_dc", [0, 1, 4])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_reweighted_attention_gradients_match_autograd_reference(num_dc, masked, fused):
    B, h, n, d = 2, 3, 21, 8
    q, k, v = make_qkv(B, h, n, d, seed=num_dc + 5)
    omega1, omega2 = make_omegas(h, seed=num_dc)
    bias = dc_key_bias(B, n, num_dc) if masked else None
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(B, h, n, d, generator=gen)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, 1 + omega1, 1 + omega2)]
    out, _ = reweighted_attention(*leaves[:3], d**-0.5, num_dc, *leaves[3:], bias, fused)
    (out * weight).sum().backward()

    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v, omega1, omega2)]
    expected = ref.reweighted_attention(*ref_leaves[:3], d**-0.5, num_dc, *ref_leaves[3:], bias)
    (expected * weight.double()).sum().backward()

    for name, got, want in zip("q k v omega1 omega2".split(), leaves, ref_leaves, strict=True):
        if got.grad is None:  # only acceptable for ω2 without DC tokens, where it is unused
            assert name == "omega2" and num_dc == 0
            assert (want.grad == 0).all()
            continue
        assert_close(got.grad.double(), want.grad, atol=1e-5, rtol=1e-5, msg=name)
    if num_dc > 1 or (num_dc == 1 and not masked):  # some DC token takes part in attention
        assert leaves[4].grad.abs().sum() > 0  # then ω2 is trained


def test_identity_mode_is_plain_attention_at_init():
    """reweight='identity' (ω1 = 0, ω2 = -1) reproduces the plain module, DC tokens or not."""
    torch.manual_seed(0)
    plain = Attention(24, 3)
    rew = Attention(24, 3, reweight="identity")
    missing, unexpected = rew.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["omega1", "omega2"] and unexpected == []
    x = torch.randn(2, 15, 24)
    bias = dc_key_bias(2, 15, 4)
    for num_dc in (0, 4):
        for kb in (None, bias if num_dc else None):
            assert_close(rew(x, kb, num_dc)[0], plain(x, kb, num_dc)[0], atol=1e-6, rtol=1e-5)


def test_paper_mode_counts_dc_columns_twice():
    """reweight='paper' (ω1 = ω2 = 0): Â = A + A_DC, the literal formula, against the reference."""
    torch.manual_seed(1)
    att = Attention(24, 3, reweight="paper")
    x = torch.randn(2, 15, 24)
    B, n, C = x.shape
    out, _ = att(x, None, 4)
    q, k, v = att.qkv(x).reshape(B, n, 3, 3, 8).permute(2, 0, 3, 1, 4)
    A = ref.attention_matrix(q, k, att.scale)
    hat = A.clone()
    hat[..., -4:] *= 2
    expected = (hat @ v.double()).transpose(1, 2).reshape(B, n, C)
    expected = expected @ att.proj.weight.double().T + att.proj.bias.double()
    assert_close(out.double(), expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, att(x, None, 0)[0])  # the DC term is really there


@pytest.mark.parametrize("fused", [True, False])
def test_attention_module_stats(fused):
    torch.manual_seed(2)
    att = Attention(32, 4, fused_attn=fused, reweight="identity")
    x = torch.randn(2, 11, 32, requires_grad=True)
    out, stats = att(x, None, 2, return_stats=True)
    assert out.shape == (2, 11, 32)
    assert stats.q.shape == stats.k.shape == (2, 4, 11, 8) and stats.scale == 8**-0.5
    assert not stats.q.requires_grad and not stats.k.requires_grad
    if fused:
        logits = stats.q.double() @ stats.k.double().transpose(-2, -1) * stats.scale
        assert_close(stats.lse.double(), logits.logsumexp(-1), atol=1e-5, rtol=1e-6)
        assert not stats.lse.requires_grad
    else:
        assert stats.lse is None
