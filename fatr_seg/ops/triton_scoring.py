"""Triton kernels for the exact HF score (column mean of the softmax attention map).

Two passes, neither holding the ``(n_q, n_k)`` map:

1. ``_row_lse_kernel``: one program per (query tile, batch·head) streams over key tiles with an
   online max/sum and stores each query row's log-sum-exp.
2. ``_column_sum_kernel``: one program per (key tile, batch·head) streams over query tiles and sums
   ``exp(logit - lse)``. Each program owns its outputs, so there are no atomics and the result is
   deterministic; the per-head partial sums are reduced in torch.

Triton is imported here, guarded, so that importing ``fatr_seg.ops`` never needs it. The kernels
also run on CPU tensors under ``TRITON_INTERPRET=1`` (set before Triton is first imported).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["column_mean_triton"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if triton is not None:

    @triton.jit
    def _logits(q, k_ptrs, bias_ptrs, offs_n, n_k, head_dim, offs_d, scale, HAS_BIAS: tl.constexpr):
        # q: (BLOCK_M, BLOCK_D) block; returns fp32 logits (BLOCK_M, BLOCK_N) with invalid keys
        # (out of range, or -inf bias) at -inf.
        kt = tl.load(k_ptrs, mask=(offs_n[None, :] < n_k) & (offs_d[:, None] < head_dim), other=0.0)
        # "ieee": fp32 inputs must not be rounded to tf32, the score has to match the explicit path.
        s = tl.dot(q, kt, input_precision="ieee") * scale
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
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
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
            s = _logits(q, k_ptrs, bias_ptrs, offs_n, n_k, head_dim, offs_d, scale, HAS_BIAS)
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
        stride_bias_b, num_heads, n_q, n_k, head_dim,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
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
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start_m in range(0, n_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
            q_mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < head_dim)
            q = tl.load(q_ptrs, mask=q_mask, other=0.0)
            # Rows past n_q get lse = +inf, hence probability 0.
            lse = tl.load(Lse + pid_bh * n_q + offs_m, mask=offs_m < n_q, other=float("inf"))
            s = _logits(q, k_ptrs, bias_ptrs, offs_n, n_k, head_dim, offs_d, scale, HAS_BIAS)
            acc += tl.sum(tl.exp(s - lse[:, None]), 0)
        tl.store(Out + pid_bh * n_k + offs_n, acc, mask=offs_n < n_k)


def column_mean_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_bias: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Column mean of ``softmax(q kᵀ · scale + key_bias)`` over heads and query rows.

    See ``fatr_seg.ops.scoring.attention_column_mean_triton`` (the public entry point).

    Args:
        q: Queries, (B, h, n_q, d).
        k: Keys, (B, h, n_k, d).
        scale: Logit scale.
        key_bias: Optional (B, n_k) additive bias, 0 or ``-inf``.
        block_m: Query tile size (power of two, >= 16).
        block_n: Key tile size (power of two, >= 16).

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
    lse = torch.empty(B * h, n_q, dtype=torch.float32, device=q.device)
    partial = torch.empty(B * h, n_k, dtype=torch.float32, device=q.device)
    if key_bias is None:
        bias, has_bias = lse, False  # placeholder pointer, never read
    else:
        bias, has_bias = key_bias.to(device=q.device, dtype=torch.float32).contiguous(), True
    # tl.dot needs every block dim >= 16; padded feature columns load as 0.
    block_d = max(16, triton.next_power_of_2(d))
    common = (
        scale,
        *q.stride(),
        *k.stride(),
        bias.stride(0),
        h,
        n_q,
        n_k,
        d,
    )
    meta = dict(HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    _row_lse_kernel[(triton.cdiv(n_q, block_m), B * h)](q, k, bias, lse, *common, **meta)
    _column_sum_kernel[(triton.cdiv(n_k, block_n), B * h)](
        q, k, bias, lse, partial, *common, **meta
    )
    return partial.view(B, h, n_k).sum(dim=1).div_(h * n_q)
