"""Scores, similarities and DC logits stay float32 under ``torch.autocast``.

Autocast runs every matmul in bf16/fp16 whatever its inputs' dtype; the scoring ops cast to
float32 first and write into float32 buffers, so before ``float32_matmul`` they crashed under
autocast (a bf16 source scattered into a float32 buffer) or rounded their similarities to bf16.
Here every op gives, inside ``torch.autocast("cpu", torch.bfloat16)``, exactly what it gives
outside it.
"""

import importlib

import pytest
import torch

from fatr_seg.ops import (
    bipartite_scores,
    cls_attention,
    float32_matmul,
    nearest_kept,
    protected_bipartite_scores,
    window_scores,
)
from fatr_seg.ops.attention import cuda_lse_kernel, reweighted_attention

attn_ops = importlib.import_module("fatr_seg.ops.attention")
pytestmark = pytest.mark.usefixtures("single_thread")


def bf16_autocast():
    return torch.autocast("cpu", torch.bfloat16)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_float32_matmul_ignores_autocast():
    a, b = randn(3, 5, 7), randn(3, 7, 4, seed=1)
    with bf16_autocast():
        assert (a @ b).dtype == torch.bfloat16  # what autocast does to a plain matmul
        out = float32_matmul(a.bfloat16(), b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, a.bfloat16().float() @ b, rtol=0, atol=0)
    assert float32_matmul(a.double(), b).dtype == torch.float64
    assert float32_matmul(a.to("meta"), b.to("meta")).shape == (3, 5, 4)  # no autocast on meta


@pytest.mark.parametrize(
    "op",
    [
        lambda m: bipartite_scores(m),
        lambda m: protected_bipartite_scores(m, m[..., 0], 5),
        lambda m: window_scores(m, (6, 6), 2),
        lambda m: (
            nearest_kept(
                m, torch.arange(0, 36, 3).expand(2, -1), torch.arange(1, 36, 3).expand(2, -1)
            ),
        ),  # fmt: skip
    ],
    ids=["bipartite", "protected_bipartite", "window", "nearest_kept"],
)
def test_similarity_ops_are_float32_under_autocast(op):
    metric = randn(2, 36, 16)
    want = op(metric)
    with bf16_autocast():
        got = op(metric)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        assert torch.equal(g, w)


def test_cls_attention_is_float32_under_autocast():
    q, k = randn(2, 3, 10, 8), randn(2, 3, 10, 8, seed=1)
    bias = torch.zeros(2, 10)
    bias[1, 4] = float("-inf")
    want = cls_attention(q, k, 0.35, bias)
    with bf16_autocast():
        got = cls_attention(q, k, 0.35, bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dc_logits_off_the_lse_are_float32_under_autocast():
    """Inference reads ``A[:, DC]`` off float32 logits of the bf16 q, k: as an explicit
    float32 softmax of those same bf16 values gives it."""
    q, k, v = (randn(2, 3, 20, 8, seed=s).bfloat16() for s in range(3))
    coef = torch.ones(3)
    with torch.no_grad(), bf16_autocast():
        out, _ = reweighted_attention(q, k, v, 0.35, 4, coef, coef + 0.5)
    a = (q.float() @ k.float().transpose(-2, -1) * 0.35).softmax(-1)
    want = a @ v.float() + 1.5 * a[..., -4:] @ v[:, :, -4:].float()
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_cuda_kernel_choice_is_a_compile_time_constant(monkeypatch):
    """``cuda_lse_kernel`` runs torch's dispatch checks once per key, and dynamo evaluates it
    while tracing (a fullgraph compile would otherwise break on ``SDPAParams``)."""
    probes = []

    def probe(*key):
        probes.append(key)
        return "flash" if not key[3] else "efficient"

    monkeypatch.setattr(attn_ops, "_probe_cuda_kernel", probe)
    monkeypatch.setattr(attn_ops, "_CUDA_KERNELS", {})
    cuda = torch.device("cuda", 0)

    def fn(x):
        kernel = cuda_lse_kernel(cuda, torch.bfloat16, 64, False, False)
        return x * 2 if kernel == "flash" else x * 3

    x = torch.ones(3)
    assert torch.equal(fn(x), x * 2)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), x * 2)
    assert probes == [(cuda, torch.bfloat16, 64, False, False)]  # cached: probed once
    assert cuda_lse_kernel(cuda, torch.bfloat16, 64, True, False) == "efficient"
    assert len(probes) == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_exact_column_mean_is_float32_under_autocast(with_lse, batch):
    """The exact HF score's logits stay float32 inside autocast (before, CPU autocast ran the
    chunks' matmuls in bf16, and with the log-sum-exp the bf16 product met a float32 buffer)."""
    from fatr_seg.ops import attention_column_mean, attention_with_lse

    q, k, v = (randn(batch, 2, 37, 8, seed=s) for s in range(3))
    bias = torch.zeros(batch, 37)
    bias[-1, 5] = float("-inf")
    lse = attention_with_lse(q, k, v, 0.35, bias)[1] if with_lse else None
    want = attention_column_mean(q, k, 0.35, bias, lse=lse)
    with bf16_autocast():
        got = attention_column_mean(q, k, 0.35, bias, lse=lse)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
