"""The CUDA inference path of the attention: the row log-sum-exp from CUDA's fused kernels.

No GPU is needed for most of this file:

* the real ATen ops run on ``meta`` tensors, which checks our call against their schemas and the
  shapes they return (the memory-efficient kernel pads its log-sum-exp rows to 32);
* CPU stand-ins that keep the CUDA kernels' contract (padded log-sum-exp rows holding garbage,
  a key bias that must be 16-aligned and broadcast) replace the ops, so that the CUDA branches of
  ``attention_with_lse`` and ``reweighted_attention`` run on CPU against the explicit reference.

The tests marked ``gpu`` run the real kernels and skip without CUDA.
"""

import importlib
import math

import pytest
import reference as ref
import torch
from torch.testing import assert_close

from fatr_seg.ops.attention import (
    attention_with_lse,
    kernel_bias,
    lse_kernel,
    reweighted_attention,
)

# The module, not the function fatr_seg.ops re-exports under the same name.
attn_ops = importlib.import_module("fatr_seg.ops.attention")
NEG_INF = float("-inf")
pytestmark = pytest.mark.usefixtures("single_thread")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_qkv(B, h, n, d, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    return tuple((t * s).to(device=device, dtype=dtype) for t, s in ((q, 1.5), (k, 1.5), (v, 1)))


def dc_bias(B, n, num_dc):
    bias = torch.zeros(B, n)
    bias[0, n - num_dc] = NEG_INF  # an empty DC window in image 0
    bias[-1, 3] = NEG_INF
    return bias


def explicit(q, k, v, scale, bias):
    logits = q.double() @ k.double().transpose(-2, -1) * scale
    if bias is not None:
        logits = logits + bias.double()[:, None, None, :]
    return logits.softmax(-1) @ v.double(), logits.logsumexp(-1)


class FakeCudaKernels:
    """CPU stand-ins for CUDA's flash and memory-efficient kernels, with their contracts."""

    def __init__(self):
        self.calls = []

    def efficient(self, q, k, v, bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *,
                  scale=None):  # fmt: skip
        assert compute_log_sumexp and dropout_p == 0.0 and not is_causal
        B, h, n, _ = q.shape
        if bias is not None:  # what the kernel needs: broadcast rows, 16-aligned row starts
            assert bias.shape == (B, h, n, k.shape[2]) and bias.dtype == q.dtype
            assert bias.stride(1) == bias.stride(2) == 0 and bias.stride(-1) == 1
            assert bias.stride(0) % 16 == 0
        out, lse = explicit(q, k, v, scale, None if bias is None else bias[:, 0, 0])
        padded = torch.full((B, h, math.ceil(n / 32) * 32), float("nan"))
        padded[..., :n] = lse
        self.calls.append(("efficient", q.shape[-1]))
        return out.to(q.dtype), padded, torch.empty(()), torch.empty(())

    def flash(self, q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, *,
              scale=None):  # fmt: skip
        assert dropout_p == 0.0 and not is_causal and not return_debug_mask
        out, lse = explicit(q, k, v, scale, None)
        self.calls.append(("flash", q.shape[-1]))
        n = q.shape[2]
        return (out.to(q.dtype), lse.float(), None, None, n, n, torch.empty(2), torch.empty(()),
                torch.empty(0))  # fmt: skip


@pytest.fixture
def fake_cuda(monkeypatch):
    """Route attention through the CUDA branches, with the stand-in kernels."""
    fake = FakeCudaKernels()
    monkeypatch.setattr(attn_ops, "_CUDA_EFFICIENT", fake.efficient)
    monkeypatch.setattr(attn_ops, "_CUDA_FLASH", fake.flash)

    def kernel(q, k, v, key_bias=None):
        if v.shape[-1] != q.shape[-1]:
            return None
        return "flash" if key_bias is None else "efficient"

    monkeypatch.setattr(attn_ops, "lse_kernel", kernel)
    return fake


def test_kernel_bias_is_aligned_broadcast_and_exact():
    bias = dc_bias(3, 37, 4)
    kb = kernel_bias(bias, torch.bfloat16, heads=6, n_q=37)
    assert kb.shape == (3, 6, 37, 37) and kb.dtype == torch.bfloat16
    assert kb.stride() == (48, 0, 0, 1)  # rows padded from 37 to 48 elements
    assert kb.data_ptr() % 16 == 0
    assert torch.equal(kb[:, 2, 5].float(), bias)
    assert kernel_bias(None, torch.float32, 6, 37) is None


def test_real_kernels_accept_our_call_on_meta_tensors():
    """The ATen schemas take our arguments; efficient attention pads lse rows to 32."""
    q, k, v = (torch.empty(2, 6, 1025, 64, device="meta", dtype=torch.bfloat16) for _ in range(3))
    bias = kernel_bias(torch.zeros(2, 1025, device="meta"), torch.bfloat16, 6, 1025)
    out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, False, scale=0.125
    )
    assert out.shape == (2, 6, 1025, 64) and lse.shape == (2, 6, 1056)
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, False, False, scale=0.125
    )
    assert out.shape == (2, 6, 1025, 64) and lse.shape == (2, 6, 1025)


def test_lse_kernel_choice_on_cpu():
    q, k, v = make_qkv(1, 2, 9, 8)
    assert lse_kernel(q, k, v) == "cpu_flash"
    assert lse_kernel(q, k, torch.cat([v, v], -1)) is None  # value width other than q's
    meta = torch.empty(1, 2, 9, 8, device="meta")
    assert lse_kernel(meta, meta, meta) is None


@pytest.mark.parametrize("with_bias", [False, True])
def test_cuda_branch_returns_exact_lse(fake_cuda, with_bias):
    B, h, n, d = 2, 3, 41, 8
    q, k, v = make_qkv(B, h, n, d, seed=2)
    bias = dc_bias(B, n, 3) if with_bias else None
    out, lse = attention_with_lse(q, k, v, 0.3, bias)
    want_out, want_lse = explicit(q, k, v, 0.3, bias)
    assert fake_cuda.calls == [("efficient" if with_bias else "flash", d)]
    assert lse.shape == (B, h, n) and not lse.isnan().any()  # the padding is cut off
    assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-6)
    assert_close(out.double(), want_out, atol=1e-6, rtol=1e-5)
    # Without a use for the log-sum-exp, CUDA leaves the kernel choice to torch.
    out2, lse2 = attention_with_lse(q, k, v, 0.3, bias, need_lse=False)
    assert lse2 is None and len(fake_cuda.calls) == 1
    assert_close(out2, out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_dc", [0, 1, 4])
def test_cuda_inference_reads_dc_columns_off_the_lse(fake_cuda, num_dc):
    """No padded one-hot block: one kernel call on q, k, v, then A[:, DC] from a few logits."""
    B, h, n, d = 2, 3, 30, 8
    q, k, v = make_qkv(B, h, n, d, seed=3)
    w1, w2 = torch.randn(h) * 0.7, torch.randn(h) * 0.7
    bias = dc_bias(B, n, num_dc) if num_dc else None
    with torch.no_grad():
        out, lse = reweighted_attention(q, k, v, d**-0.5, num_dc, 1 + w1, 1 + w2, bias)
    want = ref.reweighted_attention(q, k, v, d**-0.5, num_dc, w1, w2, bias)
    assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert fake_cuda.calls == [("efficient" if num_dc else "flash", d)] and lse.shape == (B, h, n)
    # With gradients the one-hot block still carries A[:, DC] through the kernel's backward.
    qg = q.clone().requires_grad_(True)
    out_grad, _ = reweighted_attention(qg, k, v, d**-0.5, num_dc, 1 + w1, 1 + w2, bias)
    assert_close(out_grad.detach(), out, atol=1e-5, rtol=1e-5)
    if num_dc:
        assert fake_cuda.calls[1] == ("efficient", d + num_dc)


# ---------------------------------------------------------------------------------------------
# Real CUDA kernels
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cuda_kernels_lse(dtype, with_bias):
    B, h, n, d = 2, 6, 1025, 64
    q, k, v = make_qkv(B, h, n, d, seed=4, dtype=dtype, device="cuda")
    bias = dc_bias(B, n, 4).cuda() if with_bias else None
    assert lse_kernel(q, k, v, bias) in ("flash", "efficient")
    out, lse = attention_with_lse(q, k, v, d**-0.5, bias)
    want_out, want_lse = explicit(q, k, v, d**-0.5, bias)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    assert lse.shape == (B, h, n) and lse.dtype == torch.float32
    assert_close(lse.double(), want_lse, **tol)
    assert_close(out.double(), want_out, **tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_dc", [1, 4])
def test_cuda_reweighted_inference_matches_padded_path(num_dc):
    B, h, n, d = 2, 6, 700, 64
    q, k, v = make_qkv(B, h, n, d, seed=5, device="cuda")
    w1, w2 = (torch.randn(h, device="cuda") * 0.7 for _ in range(2))
    bias = dc_bias(B, n, num_dc).cuda()
    with torch.no_grad():
        fast, lse = reweighted_attention(q, k, v, d**-0.5, num_dc, 1 + w1, 1 + w2, bias)
    assert lse is not None
    want = ref.reweighted_attention(q.cpu(), k.cpu(), v.cpu(), d**-0.5, num_dc, w1.cpu(),
                                    w2.cpu(), bias.cpu())  # fmt: skip
    assert_close(fast.double().cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_dc", [0, 4])
def test_cuda_branches_trace_as_one_graph(fake_cuda, num_dc):
    """Dynamo traces the CUDA branches (kernel choice, aligned key bias, padded log-sum-exp,
    ``A[:, DC]`` off the logits) without a break, with eager's results: what
    ``torch.compile(fullgraph=True)`` meets on a GPU, here with the stand-in kernels."""
    B, h, n, d = 2, 3, 30, 8
    q, k, v = make_qkv(B, h, n, d, seed=4)
    w1, w2 = torch.randn(h) * 0.7, torch.randn(h) * 0.7
    bias = dc_bias(B, n, num_dc) if num_dc else None

    def fn(q, k, v, bias):
        return reweighted_attention(q, k, v, d**-0.5, num_dc, 1 + w1, 1 + w2, bias)

    torch._dynamo.reset()
    with torch.no_grad():
        want = fn(q, k, v, bias)
        got = torch.compile(fn, backend="eager", fullgraph=True)(q, k, v, bias)
    torch._dynamo.reset()
    assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    assert ("efficient" if num_dc else "flash", d) in fake_cuda.calls
