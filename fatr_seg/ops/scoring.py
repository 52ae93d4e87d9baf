"""High-frequency (HF) token scores.

The FATR score of token ``k`` is ``mean_{heads, queries} A[q, k] - 1/n`` with
``A = softmax(q kᵀ · scale)``. The ``-1/n`` shift does not change the ranking, so the functions
here return the plain column mean of the attention map: the mean attention a token *receives*.

Two exact implementations share one definition (see ``attention_column_mean``):

* a portable one that loops over chunks of query rows (every chunk holds full rows, so the softmax
  is exact), never holding the ``(B, h, n, n)`` map;
* a Triton kernel (``fatr_seg.ops.triton_scoring``) for CUDA.

``logit_proxy_score`` is the cheap pre-softmax approximation from the paper's appendix J; it only
approximates the ranking, so ``topk_agreement`` is provided to measure how well.

Scores are used for index selection only, so everything here runs without autograd.
"""

from typing import Optional

import torch

from .precision import AUTOCAST_DEVICES

__all__ = [
    "attention_column_mean",
    "attention_column_mean_triton",
    "hf_scores",
    "logit_proxy_score",
    "query_rows",
    "topk_agreement",
    "triton_available",
]

_METHODS = ("exact", "logit_proxy")
_LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x · log2(e))
_BACKENDS = ("auto", "chunked", "triton")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, key_bias: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, h, n, d); got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, h or d")
    if key_bias is not None and key_bias.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_bias must be (B, n_k) = {(k.shape[0], k.shape[2])}; got {tuple(key_bias.shape)}"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 accumulate in fp32; fp64 inputs stay fp64 (handy for references).
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def attention_column_mean(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_bias: torch.Tensor | None = None,
    max_chunk_bytes: int = 4 * 2**20,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact column mean of the softmax attention map, computed in chunks of query rows.

    ``s[b, j] = 1/(h·n_q) Σ_heads Σ_queries softmax_j(q·kᵀ·scale + key_bias[b])[q, j]``.

    Each chunk of ``c`` query rows builds its ``(B, h, c, n_k)`` logits in fp32 (fp64 for fp64
    inputs; also inside ``torch.autocast``), at most ``max_chunk_bytes`` of them, so the softmax
    over keys is exact and the full ``(B, h, n_q, n_k)`` map is never held.

    Args:
        q: Queries, (B, h, n_q, d). Any float dtype.
        k: Keys, (B, h, n_k, d). Same dtype as ``q``.
        scale: Logit scale, usually ``d ** -0.5``.
        key_bias: Optional additive logit bias per key, (B, n_k): 0 for valid keys, ``-inf`` for
            masked ones (which then score exactly 0). Every batch element needs at least one
            unmasked key, otherwise its softmax is undefined (NaN).
        max_chunk_bytes: Upper bound on the fp32 logits of one chunk; at least one query row is
            processed per chunk whatever the bound.
        lse: Optional row log-sum-exp of the same logits, (B, h, n_q), as returned by the fused
            attention kernel (:func:`fatr_seg.ops.attention_with_lse`). With it each chunk is
            just ``exp(logits - lse)``, skipping the row max and row sum.

    Returns:
        Scores, (B, n_k), float32.
    """
    _check_inputs(q, k, key_bias)
    B = q.shape[0]
    if B > 1 and not q.is_cuda:
        # One image at a time on CPU: the budget then buys B times more query rows per chunk,
        # and a (c, d) @ (d, n_k) product with c ~ 20 (batch 8, 1025 tokens, 6 heads) runs at
        # about half the rate of one with c ~ 170 (ViT-S 512², 1 thread: 250 -> 170 ms a layer).
        return torch.cat([
            attention_column_mean(
                q[b : b + 1], k[b : b + 1], scale,
                None if key_bias is None else key_bias[b : b + 1], max_chunk_bytes,
                None if lse is None else lse[b : b + 1],
            )
            for b in range(B)
        ])  # fmt: skip
    if q.device.type in AUTOCAST_DEVICES:  # fp32 logits also inside torch.autocast
        with torch.autocast(q.device.type, enabled=False):
            return _chunked_column_mean(q, k, scale, key_bias, max_chunk_bytes, lse)
    return _chunked_column_mean(q, k, scale, key_bias, max_chunk_bytes, lse)


def _chunked_column_mean(q, k, scale, key_bias, max_chunk_bytes, lse) -> torch.Tensor:
    B, h, n_q, d = q.shape
    n_k = k.shape[2]
    dtype = _compute_dtype(q.dtype)
    # The logits are taken in base 2 (scale, bias and lse times log2(e)), so that the one
    # exponential per attention entry is exp2: 3x cheaper than exp on CPU (AVX-512, 1 thread:
    # 0.27 against 0.82 ns an entry), where exp was 1.8 % of FATR's ViT-S backbone at batch 1.
    # (B·h, d, n_k): a view of the qkv buffer for one image (the CPU path scores one at a time),
    # which the product reads with its leading dimension; no copy of k.
    kt = k.to(dtype).reshape(B * h, n_k, d).transpose(1, 2)
    bias = None if key_bias is None else (key_bias.to(dtype) * _LOG2E)[:, None, None, :]

    row_bytes = B * h * n_k * torch.finfo(dtype).bits // 8
    chunk = max(1, min(n_q, max_chunk_bytes // max(row_bytes, 1)))
    if lse is not None:
        lse = lse.to(dtype)
    col_sum = None
    for start in range(0, n_q, chunk):
        c = min(chunk, n_q - start)
        qc = q[:, :, start : start + c].to(dtype).reshape(B * h, c, d)
        if lse is not None:
            # One product gives the base-2 logits minus the row log-sum-exp:
            # log2(e) · (q·k · scale - lse), so each entry is exp2 of it, the probability.
            rows = lse[:, :, start : start + c].reshape(B * h, c, 1)
            logits = torch.baddbmm(rows, qc, kt, beta=-_LOG2E, alpha=scale * _LOG2E)
            logits = logits.view(B, h * c, n_k)
            if bias is not None:
                logits.view(B, h, c, n_k).add_(bias)
            logits.exp2_()
            if c == n_q:  # one chunk: the column mean in one reduction
                return logits.mean(dim=1).float()
            # A plain sum, not a product with ones (2.8x faster, but MAC counters would count
            # the sum as n·n_k multiply-adds and move every budget matched by MACs).
            part = logits.sum(dim=1)
            col_sum = part if col_sum is None else col_sum.add_(part)
            continue
        logits = torch.bmm(qc * (scale * _LOG2E), kt).view(B, h, c, n_k)  # base-2 logits
        if bias is not None:
            logits.add_(bias)
        # Softmax in place: exp(l - max) then weight each row by 1/Σ while summing over rows, as one
        # (B, 1, h·c) @ (B, h·c, n_k) product, so no second (B, h, c, n_k) tensor is allocated.
        logits.sub_(logits.amax(dim=-1, keepdim=True)).exp2_()
        inv_row_sum = logits.sum(dim=-1).reciprocal_()  # (B, h, c)
        part = torch.bmm(inv_row_sum.view(B, 1, h * c), logits.view(B, h * c, n_k)).view(B, n_k)
        col_sum = part if col_sum is None else col_sum.add_(part)
    return col_sum.div_(h * n_q).float()


@torch.no_grad()
def attention_column_mean_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_bias: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact column mean of the softmax attention map with a two-pass Triton kernel.

    Same result as ``attention_column_mean``. Pass 1 computes each query row's log-sum-exp over
    key tiles (skipped when ``lse`` is given); pass 2 sums ``exp(logit - lse)`` over query tiles
    for each key tile. Autotuned on CUDA (see ``fatr_seg.ops.triton_scoring``). Needs CUDA
    tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before Triton is imported.

    Args:
        q: Queries, (B, h, n_q, d). fp16, bf16 or fp32 (fp64 is computed in fp32).
        k: Keys, (B, h, n_k, d). Same dtype as ``q``.
        scale: Logit scale, usually ``d ** -0.5``.
        key_bias: Optional additive logit bias per key, (B, n_k): 0 or ``-inf``.
        lse: Optional (B, h, n_q) row log-sum-exp of the same logits, as the fused attention
            kernel returns it (:func:`fatr_seg.ops.attention_with_lse`).

    Returns:
        Scores, (B, n_k), float32.

    Raises:
        ImportError: If Triton is not installed.
    """
    _check_inputs(q, k, key_bias)
    return _column_mean_triton_op(q, k, float(scale), key_bias, lse)


@torch.library.custom_op("fatr_seg::attention_column_mean_triton", mutates_args=())
def _column_mean_triton_op(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_bias: Optional[torch.Tensor],  # noqa: UP045 - custom_op's schema inference reads it
    lse: Optional[torch.Tensor],  # noqa: UP045
) -> torch.Tensor:
    """The Triton scorer as one opaque operator: ``torch.compile`` keeps it as a single call
    (its autotuned kernels) instead of tracing the chunked loop, and eager and compiled models
    score with the same kernels."""
    from .triton_scoring import column_mean_triton

    return column_mean_triton(q, k, scale, key_bias, lse=lse)


@_column_mean_triton_op.register_fake
def _(q, k, scale, key_bias, lse):
    return q.new_empty((q.shape[0], k.shape[2]), dtype=torch.float32)


@torch.no_grad()
def logit_proxy_score(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pre-softmax proxy of the HF score (paper, appendix J): ``S_j = (Σ_q q_q) · k_j · scale``.

    Linear in the number of tokens, but only an approximation of the exact ranking (the softmax is
    per query row). Averaged over heads.

    Args:
        q: Queries, (B, h, n_q, d).
        k: Keys, (B, h, n_k, d).
        scale: Logit scale.
        key_bias: Optional (B, n_k) bias; keys with ``-inf`` get ``-inf``, others are unchanged.

    Returns:
        Proxy scores, (B, n_k), float32. Comparable within a batch element only.
    """
    _check_inputs(q, k, key_bias)
    dtype = _compute_dtype(q.dtype)
    q_sum = q.to(dtype).sum(dim=2, keepdim=True)  # (B, h, 1, d)
    score = torch.matmul(q_sum, k.to(dtype).transpose(-2, -1))  # (B, h, 1, n_k)
    score = score.squeeze(2).mean(dim=1).mul_(scale)  # (B, n_k)
    if key_bias is not None:
        score = score.masked_fill(key_bias == float("-inf"), float("-inf"))
    return score.float()


def triton_available() -> bool:
    """Whether Triton can be imported (the ``'auto'`` backend then scores CUDA tensors with it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def hf_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    method: str = "exact",
    key_bias: torch.Tensor | None = None,
    backend: str = "auto",
    lse: torch.Tensor | None = None,
    queries: int | None = None,
) -> torch.Tensor:
    """HF scores of all keys: the entry point used by the reducer.

    Args:
        q: Queries, (B, h, n_q, d).
        k: Keys, (B, h, n_k, d).
        scale: Logit scale.
        method: ``'exact'`` (column mean of the softmax attention map) or ``'logit_proxy'``.
        key_bias: Optional (B, n_k) bias, 0 or ``-inf`` (masked keys).
        backend: For ``method='exact'``: ``'auto'`` (Triton for CUDA tensors when Triton is
            importable, also under ``torch.compile``, where it is one opaque operator; chunked
            otherwise), ``'chunked'`` or ``'triton'``. Ignored by the proxy.
        lse: Optional (B, h, n_q) row log-sum-exp from the fused attention call; the chunked
            path then skips its own row normalisation, the Triton path its first pass.
        queries: For ``method='exact'``: estimate the column mean from about this many query
            rows instead of all (see :func:`query_rows`): each row's probabilities are still
            exact (its own softmax, or ``exp(logit - lse)``), so the estimate reads
            ``queries · n_k`` logits instead of ``n_q · n_k``. None: every row (exact).

    Returns:
        Scores, (B, n_k), float32; higher means more HF.

    Raises:
        ValueError: If ``method`` or ``backend`` is not one of the allowed values.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    if method == "logit_proxy":
        return logit_proxy_score(q, k, scale, key_bias)
    if queries is not None:
        rows = query_rows(q.shape[2], queries)
        q = q[:, :, rows]
        lse = None if lse is None else lse[:, :, rows]
    if backend == "auto":
        # Also under torch.compile: traced, the chunked loop unrolls into a graph of hundreds of
        # small kernels on CUDA (32 x 6 heads x 1025 keys: 5-row chunks, 205 per layer), which
        # made the compiled ViT-S backbone twice as slow as eager on an H200 (33.6 vs 16.4 ms).
        backend = "triton" if q.is_cuda and triton_available() else "chunked"
    if backend == "triton":
        return attention_column_mean_triton(q, k, scale, key_bias, lse=lse)
    return attention_column_mean(q, k, scale, key_bias, lse=lse)


def query_rows(num_queries: int, queries: int) -> slice:
    """The fixed strided set of query rows that estimates the HF score: every ``s``-th row from
    row 0 (CLS), ``s = max(1, ⌊n_q / queries⌋)``, so between ``queries`` and ``2 · queries`` rows
    (all of them when ``n_q ≤ queries``). A slice: the rows are a view, no gather.
    """
    if queries < 1:
        raise ValueError(f"queries must be a positive number of rows; got {queries}")
    return slice(None, None, max(1, num_queries // queries))


@torch.no_grad()
def topk_agreement(score_a: torch.Tensor, score_b: torch.Tensor, k: int) -> float:
    """Mean overlap of the top-``k`` index sets of two score tensors.

    Args:
        score_a: Scores, (B, n).
        score_b: Scores, (B, n).
        k: Set size, ``1 <= k <= n``.

    Returns:
        ``mean_b |topk(a_b) ∩ topk(b_b)| / k``, in [0, 1].
    """
    if score_a.shape != score_b.shape or score_a.dim() != 2:
        raise ValueError(f"scores must both be (B, n); got {score_a.shape} and {score_b.shape}")
    if not 1 <= k <= score_a.shape[1]:
        raise ValueError(f"k must be in [1, {score_a.shape[1]}]; got {k}")
    idx_a = score_a.topk(k, dim=1).indices
    idx_b = score_b.topk(k, dim=1).indices
    in_a = torch.zeros(score_a.shape, dtype=torch.bool, device=score_a.device)
    in_a.scatter_(1, idx_a, True)
    overlap = in_a.gather(1, idx_b).sum(dim=1)  # (B,)
    return (overlap.float() / k).mean().item()
