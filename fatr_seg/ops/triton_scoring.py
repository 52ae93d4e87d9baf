"""Triton kernels for the exact HF score (column mean of the softmax attention map).

Two passes, neither holding the ``(n_q, n_k)`` map:

1. ``_row_lse_kernel``: one program per (query tile, batch·head) streams over key tiles with an
   online max/sum and stores each query row's log-sum-exp. Skipped when the caller passes the
   log-sum-exp that the attention kernel already computed (:func:`fatr_seg.ops.attention_with_lse`).
2. ``_column_sum_kernel``: one program per (key tile, batch·head, query split) streams over its
   share of the query tiles and sums ``exp(logit - lse)``. Each program owns its outputs, so there
   are no atomics and the result is deterministic; the partial sums over splits and heads are
   reduced in torch. The query dimension is split so that a small batch still launches a couple
   of waves of programs on the GPU.

On CUDA both kernels are autotuned (tile sizes, warps, pipeline stages) per problem size, and
fp32 inputs use TF32 tensor cores when torch allows TF32 matmuls
(``torch.backends.cuda.matmul.allow_tf32``), else exact fp32 products. Triton is imported here,
guarded, so that importing ``fatr_seg.ops`` never needs it. The kernels also run on CPU tensors
under ``TRITON_INTERPRET=1`` (set before Triton is first imported), with a fixed configuration.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["TileConfig", "column_mean_triton", "query_splits"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TileConfig(NamedTuple):
    """One launch configuration of both kernels (tile sizes are powers of two, >= 16)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


# Autotuning candidates on CUDA: square and tall tiles, 4 or 8 warps, 2 or 3 stages.
TUNE_CONFIGS = (
    TileConfig(64, 64, 4, 2),
    TileConfig(64, 64, 4, 3),
    TileConfig(128, 64, 4, 3),
    TileConfig(64, 128, 4, 3),
    TileConfig(128, 64, 8, 3),
    TileConfig(128, 128, 8, 2),
    TileConfig(128, 128, 8, 3),
)

if triton is not None:

    @triton.jit
    def _logits(q, k_ptrs, bias_ptrs, offs_n, n_k, head_dim, offs_d, scale,
                HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        # q: (BLOCK_M, BLOCK_D) block; returns fp32 logits (BLOCK_M, BLOCK_N) with invalid keys
        # (out of range, or -inf bias) at -inf.
        kt = tl.load(k_ptrs, mask=(offs_n[None, :] < n_k) & (offs_d[:, None] < head_dim), other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale
        if HAS_BIAS:
            bias = tl.load(bias_ptrs, mask=offs_n < n_k, other=0.0).to(tl.float32)
            s = s + bias[None, :]
        return tl.where(offs_n[None, :] < n_k, s, float("-inf"))

    @triton.jit
    def _row_lse_kernel(
        Q, K, Bias, Lse, scale,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_bias_b, num_heads, n_q, n_k, head_dim,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // num_heads
        hd = pid_bh % num_heads
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_ptrs = (
            Q + b * stride_qb + hd * stride_qh
            + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
        )  # fmt: skip
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < n_q) & (offs_d[None, :] < head_dim), other=0.0)
        k_base = K + b * stride_kb + hd * stride_kh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, n_k, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
            bias_ptrs = Bias + b * stride_bias_b + offs_n
            s = _logits(q, k_ptrs, bias_ptrs, offs_n, n_k, head_dim, offs_d, scale, HAS_BIAS,
                        PRECISION)  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # While a row has seen only -inf logits, shift by 0 instead of -inf to avoid inf - inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        tl.store(Lse + pid_bh * n_q + offs_m, m_i + tl.log(l_i), mask=offs_m < n_q)

    @triton.jit
    def _column_sum_kernel(
        Q, K, Bias, Lse, Out, scale,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_bias_b, num_heads, n_q, n_k, head_dim, num_bh, splits,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = pid_bh // num_heads
        hd = pid_bh % num_heads
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k_ptrs = (
            K + b * stride_kb + hd * stride_kh
            + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        )  # fmt: skip
        bias_ptrs = Bias + b * stride_bias_b + offs_n
        q_base = Q + b * stride_qb + hd * stride_qh
        # This program's share of the query tiles: split pid_s of `splits`.
        tiles = tl.cdiv(n_q, BLOCK_M)
        per_split = tl.cdiv(tiles, splits)
        first = pid_s * per_split
        last = tl.minimum(first + per_split, tiles)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for tile in range(first, last):
            offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
            q_mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < head_dim)
            q = tl.load(q_ptrs, mask=q_mask, other=0.0)
            # Rows past n_q get lse = +inf, hence probability 0.
            lse = tl.load(Lse + pid_bh * n_q + offs_m, mask=offs_m < n_q, other=float("inf"))
            s = _logits(q, k_ptrs, bias_ptrs, offs_n, n_k, head_dim, offs_d, scale, HAS_BIAS,
                        PRECISION)  # fmt: skip
            acc += tl.sum(tl.exp(s - lse[:, None]), 0)
        tl.store(Out + (pid_s * num_bh + pid_bh) * n_k + offs_n, acc, mask=offs_n < n_k)

    def _tuned(kernel):
        configs = [
            triton.Config(
                dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n),
                num_warps=c.num_warps,
                num_stages=c.num_stages,
            )  # fmt: skip
            for c in TUNE_CONFIGS
        ]
        return triton.autotune(configs, key=["n_q", "n_k", "head_dim", "HAS_BIAS"])(kernel)

    _row_lse_tuned = _tuned(_row_lse_kernel)
    _column_sum_tuned = _tuned(_column_sum_kernel)


def query_splits(n_q: int, n_k: int, num_bh: int, programs: int, min_tile: int = 64) -> int:
    """How many ways pass 2 splits the query rows so that about ``programs`` programs run.

    Programs without a split: one per (key tile, batch·head), with the smallest tile. The split
    never makes a share smaller than one ``min_tile`` of query rows.
    """
    base = -(-n_k // min_tile) * num_bh
    want = -(-programs // max(base, 1))
    return max(1, min(want, -(-n_q // min_tile)))


@torch.compiler.assume_constant_result
def _multiprocessors(device: torch.device) -> int:
    """The device's multiprocessor count; a constant under ``torch.compile``."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(q: torch.Tensor) -> str:
    # TF32 only where torch itself allows it for fp32 matmuls; the explicit path is the reference.
    tf32 = q.is_cuda and q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


def column_mean_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_bias: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    lse: torch.Tensor | None = None,
    splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Column mean of ``softmax(q kᵀ · scale + key_bias)`` over heads and query rows.

    See ``fatr_seg.ops.scoring.attention_column_mean_triton`` (the public entry point).

    Args:
        q: Queries, (B, h, n_q, d).
        k: Keys, (B, h, n_k, d).
        scale: Logit scale.
        key_bias: Optional (B, n_k) additive bias, 0 or ``-inf``.
        block_m: Query tile size (power of two, >= 16). With ``block_n``, fixes the launch
            configuration; by default it is autotuned on CUDA and 64 elsewhere.
        block_n: Key tile size (power of two, >= 16).
        lse: Optional (B, h, n_q) row log-sum-exp of the same logits (from the attention kernel):
            pass 1 is skipped.
        splits: Query splits of pass 2 (default: enough for two programs per multiprocessor on
            CUDA, 1 elsewhere).
        num_warps: Warps per program with a fixed configuration.
        num_stages: Pipeline stages with a fixed configuration.

    Returns:
        Scores, (B, n_k), float32.
    """
    if triton is None:
        raise ImportError("attention_column_mean_triton needs triton; use backend='chunked'")
    B, h, n_q, d = q.shape
    n_k = k.shape[2]
    if q.dtype not in _KERNEL_DTYPES or k.dtype != q.dtype:
        q, k = q.float(), k.float()
    elif q.dtype == torch.bfloat16 and not q.is_cuda:
        # The interpreter stores bf16 as uint16 and tl.dot multiplies the raw bits
        # (triton-lang/triton#11584, not supported upstream); bf16 -> fp32 is exact.
        q, k = q.float(), k.float()
    if lse is not None:
        if tuple(lse.shape) != (B, h, n_q):
            raise ValueError(f"lse must be (B, h, n_q) = {(B, h, n_q)}; got {tuple(lse.shape)}")
        lse = lse.to(device=q.device, dtype=torch.float32).reshape(B * h, n_q).contiguous()
    if splits is None:
        sms = _multiprocessors(q.device) if q.is_cuda else 0
        splits = query_splits(n_q, n_k, B * h, 2 * sms) if sms else 1
    partial = torch.empty(splits, B * h, n_k, dtype=torch.float32, device=q.device)
    if key_bias is None:
        bias, has_bias = partial, False  # placeholder pointer, never read
    else:
        bias, has_bias = key_bias.to(device=q.device, dtype=torch.float32).contiguous(), True
    # tl.dot needs every block dim >= 16; padded feature columns load as 0.
    block_d = max(16, triton.next_power_of_2(d))
    strides = (*q.stride(), *k.stride(), bias.stride(0), h, n_q, n_k, d)
    meta = dict(HAS_BIAS=has_bias, PRECISION=_precision(q), BLOCK_D=block_d)
    fixed = block_m is not None or block_n is not None or not q.is_cuda
    if fixed:
        meta.update(BLOCK_M=block_m or 64, BLOCK_N=block_n or 64, num_warps=num_warps,
                    num_stages=num_stages)  # fmt: skip
        row_lse, column_sum = _row_lse_kernel, _column_sum_kernel
    else:
        row_lse, column_sum = _row_lse_tuned, _column_sum_tuned
    if lse is None:
        lse = torch.empty(B * h, n_q, dtype=torch.float32, device=q.device)
        grid = lambda m: (triton.cdiv(n_q, m["BLOCK_M"]), B * h)  # noqa: E731
        row_lse[grid](q, k, bias, lse, scale, *strides, **meta)
    grid = lambda m: (triton.cdiv(n_k, m["BLOCK_N"]), B * h, splits)  # noqa: E731
    column_sum[grid](q, k, bias, lse, partial, scale, *strides, B * h, splits, **meta)
    return partial.view(splits, B, h, n_k).sum(dim=(0, 2)).div_(h * n_q)
