import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fatr_seg.ops.scoring import (
    attention_column_mean,
    hf_scores,
    logit_proxy_score,
    topk_agreement,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
NEG_INF = float("-inf")


def subprocess_env(**extra):
    """Environment for a child interpreter that imports fatr_seg from this checkout."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def reference_column_mean(q, k, scale, key_bias=None):
    """Explicit (B, h, n, n) softmax in fp64, then the mean over heads and query rows."""
    logits = q.double() @ k.double().transpose(-2, -1) * scale  # (B, h, n_q, n_k)
    if key_bias is not None:
        logits = logits + key_bias.double()[:, None, None, :]
    return logits.softmax(dim=-1).mean(dim=(1, 2)).float()  # (B, n_k)


def reference_logit_proxy(q, k, scale, key_bias=None):
    proxy = torch.einsum("bhqd,bhkd->bk", q.double(), k.double()) / q.shape[1] * scale
    if key_bias is not None:
        proxy = proxy.masked_fill(key_bias == NEG_INF, NEG_INF)
    return proxy.float()


def make_qk(B, h, n, d, dtype=torch.float32, seed=0, sharpness=2.0):
    """Non-contiguous q, k split from one qkv projection, as an attention layer produces them."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, n, 3 * h * d, generator=gen) * sharpness
    q, k, _ = qkv.reshape(B, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, n, d)
    return q.to(dtype), k.to(dtype)


def make_key_bias(B, n, seed=0):
    """0 for valid keys, -inf for a few masked ones (never all of a batch element)."""
    gen = torch.Generator().manual_seed(seed + 1)
    masked = torch.rand(B, n, generator=gen) < 0.2
    masked[:, 0] = False
    masked[:, -1] = True
    return torch.zeros(B, n).masked_fill(masked, NEG_INF)


SHAPES = [  # (B, h, n, d)
    (1, 1, 23 * 37 + 1 + 4, 16),  # odd n: CLS + 23x37 grid + 4 DC tokens
    (3, 6, 23 * 37 + 1 + 4, 8),
    (3, 1, 37, 64),
    (1, 6, 2, 4),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("max_chunk_bytes", [1, 1_000_000, 64 * 2**20])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_matches_explicit_softmax(shape, max_chunk_bytes, with_bias):
    B, h, n, d = shape
    q, k = make_qk(B, h, n, d)
    bias = make_key_bias(B, n) if with_bias else None
    scale = d**-0.5

    scores = attention_column_mean(q, k, scale, bias, max_chunk_bytes=max_chunk_bytes)

    assert scores.dtype == torch.float32 and scores.shape == (B, n)
    assert not scores.isnan().any()
    torch.testing.assert_close(
        scores, reference_column_mean(q, k, scale, bias), atol=1e-6, rtol=1e-5
    )
    # Rows of A sum to 1, so the column means do too.
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(B), atol=1e-5, rtol=0)
    if with_bias:
        assert (scores[bias == NEG_INF] == 0).all()


def test_chunk_size_does_not_change_result():
    q, k = make_qk(2, 3, 301, 32, seed=3)
    one_row = attention_column_mean(q, k, 0.2, max_chunk_bytes=1)
    whole = attention_column_mean(q, k, 0.2, max_chunk_bytes=2**40)
    torch.testing.assert_close(one_row, whole, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("max_chunk_bytes", [1, 4 * 2**20])
def test_batch_with_lse_and_bias_matches_explicit_softmax(max_chunk_bytes):
    # Batches run one image at a time on CPU; each image keeps its own bias and row lse.
    B, h, n, d = 4, 6, 23 * 37 + 1 + 4, 16
    q, k = make_qk(B, h, n, d, seed=5)
    bias = make_key_bias(B, n)
    scale = d**-0.5
    lse = torch.logsumexp((q @ k.transpose(-2, -1)) * scale + bias[:, None, None, :], dim=-1)

    scores = attention_column_mean(q, k, scale, bias, max_chunk_bytes=max_chunk_bytes, lse=lse)

    torch.testing.assert_close(
        scores, reference_column_mean(q, k, scale, bias), atol=1e-6, rtol=1e-5
    )
    assert (scores[bias == NEG_INF] == 0).all()


def test_no_autograd_graph():
    q, k = make_qk(1, 2, 17, 8)
    q.requires_grad_(True)
    assert not attention_column_mean(q, k, 0.5).requires_grad
    assert not logit_proxy_score(q, k, 0.5).requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    B, h, n, d = 2, 6, 23 * 37 + 1 + 4, 64
    q, k = make_qk(B, h, n, d, dtype=dtype, sharpness=1.0)
    bias = make_key_bias(B, n)

    scores = attention_column_mean(q, k, d**-0.5, bias, max_chunk_bytes=100_000)

    assert scores.dtype == torch.float32
    expected = reference_column_mean(q.float(), k.float(), d**-0.5, bias)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    assert (scores[bias == NEG_INF] == 0).all()


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    h=st.integers(1, 4),
    n=st.integers(1, 70),
    d=st.integers(1, 20),
    chunk=st.integers(1, 5_000),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_reference_property(B, h, n, d, chunk, seed):
    q, k = make_qk(B, h, n, d, seed=seed)
    torch.testing.assert_close(
        attention_column_mean(q, k, d**-0.5, max_chunk_bytes=chunk),
        reference_column_mean(q, k, d**-0.5),
        atol=1e-6,
        rtol=1e-5,
    )


def test_rejects_mismatched_shapes():
    q, k = make_qk(2, 3, 10, 8)
    with pytest.raises(ValueError, match="key_bias"):
        attention_column_mean(q, k, 1.0, torch.zeros(2, 11))
    with pytest.raises(ValueError, match="disagree"):
        attention_column_mean(q, k[:, :2], 1.0)


def test_logit_proxy_matches_reference():
    B, h, n, d = 3, 6, 23 * 37 + 1 + 4, 16
    q, k = make_qk(B, h, n, d)
    bias = make_key_bias(B, n)

    plain = logit_proxy_score(q, k, d**-0.5)
    masked = logit_proxy_score(q, k, d**-0.5, bias)

    assert plain.dtype == torch.float32 and plain.shape == (B, n)
    expected = reference_logit_proxy(q, k, d**-0.5)
    # Proxy values are O(100) sums over all queries; fp32 error is relative to that magnitude.
    atol = 1e-6 * expected.abs().max().item()
    torch.testing.assert_close(plain, expected, atol=atol, rtol=1e-5)
    assert (masked[bias == NEG_INF] == NEG_INF).all()
    torch.testing.assert_close(masked[bias == 0], plain[bias == 0])


def test_topk_agreement_values():
    a = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    assert topk_agreement(a, b, 2) == 0.5  # no overlap in row 0, full overlap in row 1
    assert topk_agreement(a, b, 4) == 1.0
    assert topk_agreement(a, b, 3) == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="k must be"):
        topk_agreement(a, b, 0)


def test_proxy_vs_exact_agreement_is_a_fraction():
    B, h, n, d = 2, 6, 1 + 16 * 16, 64
    q, k = make_qk(B, h, n, d, sharpness=1.0)
    exact = attention_column_mean(q, k, d**-0.5)
    proxy = logit_proxy_score(q, k, d**-0.5)
    keep = int(0.7 * (n - 1))
    agreement = topk_agreement(proxy[:, 1:], exact[:, 1:], keep)
    assert 0.0 <= agreement <= 1.0
    assert topk_agreement(exact[:, 1:], exact[:, 1:].clone(), keep) == 1.0


def test_dispatcher():
    q, k = make_qk(2, 3, 40, 16)
    bias = make_key_bias(2, 40)
    exact = attention_column_mean(q, k, 0.25, bias)
    torch.testing.assert_close(hf_scores(q, k, 0.25, key_bias=bias), exact, atol=0, rtol=0)
    torch.testing.assert_close(
        hf_scores(q, k, 0.25, key_bias=bias, backend="chunked"), exact, atol=0, rtol=0
    )
    torch.testing.assert_close(
        hf_scores(q, k, 0.25, method="logit_proxy", key_bias=bias),
        logit_proxy_score(q, k, 0.25, bias),
        atol=0,
        rtol=0,
    )
    with pytest.raises(ValueError, match="method"):
        hf_scores(q, k, 0.25, method="abs")
    with pytest.raises(ValueError, match="backend"):
        hf_scores(q, k, 0.25, backend="cuda")


TRITON_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from fatr_seg.ops.scoring import attention_column_mean_triton, hf_scores
    from fatr_seg.ops.triton_scoring import column_mean_triton
    sys.path.insert(0, {tests_dir!r})
    from test_scoring import make_key_bias, make_qk, reference_column_mean

    failures = []
    cases = [  # (B, h, n, d, dtype, with_bias, block)
        (2, 3, 150, 24, torch.float32, True, 64),
        (1, 2, 70, 64, torch.float32, False, 64),
        (2, 1, 53, 5, torch.float32, True, 16),
        (1, 2, 90, 32, torch.float16, True, 32),
        (1, 2, 90, 32, torch.bfloat16, True, 32),
    ]
    for B, h, n, d, dtype, with_bias, block in cases:
        q, k = make_qk(B, h, n, d, dtype=dtype)
        bias = make_key_bias(B, n) if with_bias else None
        got = column_mean_triton(q, k, d**-0.5, bias, block_m=block, block_n=block)
        want = reference_column_mean(q.float(), k.float(), d**-0.5, bias)
        try:
            assert got.dtype == torch.float32 and not got.isnan().any()
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            if bias is not None:
                assert (got[bias == float("-inf")] == 0).all()
        except AssertionError as err:
            failures.append(f"{{(B, h, n, d, dtype, with_bias, block)}}: {{err}}")
    # The default's estimate: every s-th query row (a strided view) and its lse, as the reducer
    # passes them; the Triton path must read the same rows as the chunked one.
    q, k = make_qk(2, 2, 70, 16)
    lse = (q @ k.transpose(-2, -1) * 0.25).logsumexp(-1)
    try:
        torch.testing.assert_close(
            hf_scores(q, k, 0.25, backend="triton", lse=lse, queries=16),
            hf_scores(q, k, 0.25, backend="chunked", lse=lse, queries=16), atol=1e-6, rtol=1e-5,
        )
    except AssertionError as err:
        failures.append(f"strided query rows: {{err}}")
    q, k = make_qk(1, 2, 33, 16)
    via_dispatch = hf_scores(q, k, 0.25, backend="triton")
    try:
        torch.testing.assert_close(
            via_dispatch, attention_column_mean_triton(q, k, 0.25), atol=0, rtol=0
        )
    except AssertionError as err:
        failures.append(f"dispatcher: {{err}}")
    # One opaque operator under torch.compile (not the chunked loop traced), same scores; its
    # schema and fake (meta) implementation checked by torch.library.opcheck.
    op = torch.ops.fatr_seg.attention_column_mean_triton.default
    bias = make_key_bias(1, 33)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                       and "grad_enabled" not in str(n.target)])  # no_grad's enter and exit
        return gm

    compiled = torch.compile(lambda q, k, b: hf_scores(q, k, 0.25, key_bias=b, backend="triton"),
                             backend=backend, fullgraph=True)
    try:
        torch.testing.assert_close(compiled(q, k, bias),
                                   attention_column_mean_triton(q, k, 0.25, bias), atol=0, rtol=0)
        assert graphs == [[str(op)]], graphs
        torch.library.opcheck(op, (q, k, 0.25, bias, None))
        torch.library.opcheck(op, (q, k, 0.25, None, torch.randn(1, 2, 33)))
    except Exception as err:
        failures.append(f"compiled operator: {{type(err).__name__}}: {{err}}")
    if failures:
        print("\\n".join(failures))
        sys.exit(1)
    print("ok")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_under_interpreter():
    # TRITON_INTERPRET is read when triton is imported, hence the fresh interpreter.
    script = TRITON_INTERPRET_SCRIPT.format(tests_dir=str(Path(__file__).parent))
    env = subprocess_env(TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_on_cuda(dtype):
    B, h, n, d = 2, 6, 23 * 37 + 1 + 4, 64
    q, k = make_qk(B, h, n, d, dtype=dtype, sharpness=1.0)
    bias = make_key_bias(B, n)
    q, k, bias = q.cuda(), k.cuda(), bias.cuda()

    got = hf_scores(q, k, d**-0.5, key_bias=bias)  # 'auto' picks triton on CUDA
    chunked = hf_scores(q, k, d**-0.5, key_bias=bias, backend="chunked")
    want = reference_column_mean(q.float(), k.float(), d**-0.5, bias)

    assert got.dtype == torch.float32 and got.is_cuda
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(chunked, want, atol=1e-6, rtol=1e-4)
    assert (got[bias == NEG_INF] == 0).all()


MEMORY_SCRIPT = textwrap.dedent(
    """
    import torch
    from fatr_seg.ops.scoring import attention_column_mean

    torch.manual_seed(0)
    q = torch.randn(1, 6, 16384, 64)
    k = torch.randn(1, 6, 16384, 64)
    scores = attention_column_mean(q, k, 64**-0.5)
    assert scores.shape == (1, 16384) and not scores.isnan().any()
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0), atol=1e-4, rtol=0)
    from fatr_seg.analysis.timing import peak_rss_bytes  # VmHWM: this address space's peak

    print(peak_rss_bytes() // 1024)  # KiB. Not ru_maxrss: it keeps the parent's peak on exec.
    """
)


@pytest.mark.slow
def test_exact_scoring_memory_at_16k_tokens():
    # The explicit (1, 6, 16384, 16384) fp32 map alone would take 6 GiB.
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    peak_gib = int(proc.stdout.split()[-1]) / 2**20
    assert peak_gib < 1.5, f"peak RSS {peak_gib:.2f} GiB"
