"""The tuned Triton scorer under ``TRITON_INTERPRET=1``: every tile configuration, query splits,
and the attention kernel's log-sum-exp reused, against ``attention_column_mean``.

The interpreter runs the kernels on CPU tensors (autotuning needs a GPU, so each configuration
of the autotuner's list is launched explicitly). The CUDA test runs the autotuned kernels.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fatr_seg.ops.triton_scoring import TUNE_CONFIGS, query_splits

REPO_ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, {tests_dir!r})
    from test_scoring import make_key_bias, make_qk, reference_column_mean
    from fatr_seg.ops.attention import attention_with_lse
    from fatr_seg.ops.scoring import attention_column_mean, hf_scores
    from fatr_seg.ops.triton_scoring import TUNE_CONFIGS, column_mean_triton

    torch.manual_seed(0)
    failures = []

    def check(name, got, want, bias):
        try:
            assert got.dtype == torch.float32 and not got.isnan().any(), "dtype or NaN"
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            if bias is not None:
                assert (got[bias == float("-inf")] == 0).all(), "masked key scored"
        except AssertionError as err:
            failures.append(f"{{name}}: {{err}}")

    # Every autotuning candidate, with and without the attention kernel's lse, split or not.
    B, h, n, d = 2, 3, 197, 16
    q, k = make_qk(B, h, n, d, seed=1)
    v = torch.randn(B, h, n, d)
    bias = make_key_bias(B, n)
    _, lse = attention_with_lse(q, k, v, d**-0.5, bias)  # CPU flash kernel's row lse
    want = attention_column_mean(q, k, d**-0.5, bias, lse=lse)
    check("chunked vs reference", want, reference_column_mean(q, k, d**-0.5, bias), bias)
    for cfg in TUNE_CONFIGS:
        for splits, with_lse in ((1, False), (3, True), (7, True)):
            got = column_mean_triton(q, k, d**-0.5, bias, block_m=cfg.block_m,
                                     block_n=cfg.block_n, lse=lse if with_lse else None,
                                     splits=splits, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages)
            check(f"{{cfg}} splits={{splits}} lse={{with_lse}}", got, want, bias)

    # More splits than query tiles (empty shares), no bias, a head size that is no power of two.
    q, k = make_qk(1, 2, 40, 24, seed=2)
    want = attention_column_mean(q, k, 0.2)
    got = column_mean_triton(q, k, 0.2, block_m=16, block_n=32, splits=5)
    check("empty shares", got, want, None)

    # The dispatcher hands the lse to the kernel (pass 1 skipped): same scores.
    q, k = make_qk(1, 2, 65, 16, seed=3)
    v = torch.randn(1, 2, 65, 16)
    _, lse = attention_with_lse(q, k, v, 0.25)
    check("hf_scores lse", hf_scores(q, k, 0.25, backend="triton", lse=lse),
          attention_column_mean(q, k, 0.25), None)
    if failures:
        print("\\n".join(failures))
        sys.exit(1)
    print("ok")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_tuned_kernels_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    script = SCRIPT.format(tests_dir=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok")


def test_query_splits_fill_a_wave():
    # ViT-S at 512², batch 1: 1025 queries and keys, 6 heads: 17 key tiles x 6 = 102 programs
    # unsplit; an H200 has 132 multiprocessors, two programs each -> 3 splits.
    assert query_splits(1025, 1025, 6, 2 * 132) == 3
    assert query_splits(1025, 1025, 32 * 6, 2 * 132) == 1  # batch 32: plenty already
    assert query_splits(40, 1025, 1, 10_000) == 1  # never a share below one 64-row tile
    assert query_splits(4097, 4097, 6, 2 * 132) == 1
    assert all(c.block_m >= 16 and c.block_n >= 16 for c in TUNE_CONFIGS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autotuned_kernels_on_cuda(dtype):
    from fatr_seg.ops.attention import attention_with_lse
    from fatr_seg.ops.scoring import attention_column_mean, hf_scores

    B, h, n, d = 1, 6, 1025, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, d, generator=gen).to("cuda", dtype) for _ in range(3))
    bias = torch.zeros(B, n, device="cuda")
    bias[0, -3:] = float("-inf")
    _, lse = attention_with_lse(q, k, v, d**-0.5, bias)
    assert lse is not None
    want = attention_column_mean(q.float(), k.float(), d**-0.5, bias)
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-5, rtol=2e-2)
    torch.testing.assert_close(hf_scores(q, k, d**-0.5, key_bias=bias), want, **tol)
    torch.testing.assert_close(hf_scores(q, k, d**-0.5, key_bias=bias, lse=lse), want, **tol)
