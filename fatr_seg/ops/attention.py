"""Attention on fused kernels, with the FATR reweighting as an exact identity.

Every attention call in fatr_seg goes through :func:`attention`. The fused path is
``F.scaled_dot_product_attention`` (flash / memory-efficient on CUDA, the fused flash kernel on
CPU), or the very kernel it dispatches to where the row log-sum-exp is needed
(:func:`attention_with_lse`); the explicit softmax path beside it exists for debugging and
tests. ``FATR_FUSED_ATTN=0`` in the environment switches the default to the explicit path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .precision import float32_matmul

__all__ = [
    "attention",
    "attention_with_lse",
    "cuda_lse_kernel",
    "fused_attn_default",
    "kernel_bias",
    "lse_kernel",
    "reweighted_attention",
]


# The CUDA kernels behind F.scaled_dot_product_attention that also return the row log-sum-exp.
_CUDA_FLASH = torch.ops.aten._scaled_dot_product_flash_attention
_CUDA_EFFICIENT = torch.ops.aten._scaled_dot_product_efficient_attention


def fused_attn_default() -> bool:
    """Whether modules use the fused kernel by default (``FATR_FUSED_ATTN=0`` turns it off)."""
    return os.environ.get("FATR_FUSED_ATTN", "1") != "0"


def _bias_4d(key_bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # (B, n) -> (B, 1, 1, n): one additive bias per key, shared by heads and query rows.
    return None if key_bias is None else key_bias[:, None, None, :].to(dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_bias: torch.Tensor | None = None,
    fused: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention ``dropout(softmax(q kᵀ · scale + key_bias)) v``.

    Args:
        q: Queries, (B, h, n, d).
        k: Keys, (B, h, n, d).
        v: Values, (B, h, n, dv).
        scale: Logit scale, usually ``d ** -0.5``.
        key_bias: Optional additive bias per key, (B, n); ``-inf`` removes a key.
        fused: Use ``F.scaled_dot_product_attention``; otherwise the explicit softmax.
        dropout_p: Dropout on the attention probabilities (pass 0 outside training), as
            ``nn.MultiheadAttention``'s ``dropout`` and timm's ``attn_drop``: kept entries are
            scaled by ``1 / (1 - dropout_p)``.

    Returns:
        (B, h, n, dv).
    """
    bias = _bias_4d(key_bias, q.dtype)
    if fused:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale
        )
    logits = (q @ k.transpose(-2, -1)) * scale  # (B, h, n, n): debug path only
    if bias is not None:
        logits = logits + bias
    attn = logits.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def lse_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None = None
) -> str | None:
    """The fused kernel that returns the row log-sum-exp for these inputs, or None.

    ``'cpu_flash'`` on CPU (the kernel ``F.scaled_dot_product_attention`` runs there anyway);
    on CUDA ``'flash'`` without a key bias and ``'efficient'`` (memory-efficient attention, which
    takes the bias) where torch's own dispatch checks accept the inputs (dtype, head size, GPU
    generation; see :func:`cuda_lse_kernel`). Decided from shapes, dtypes and devices alone: no
    host synchronisation, and a constant under ``torch.compile``.
    """
    if v.shape[-1] != q.shape[-1]:
        return None
    if q.device.type == "cpu":
        return "cpu_flash"
    if q.device.type != "cuda":
        return None
    grad = q.requires_grad or k.requires_grad or v.requires_grad
    return cuda_lse_kernel(q.device, q.dtype, q.shape[-1], key_bias is not None, grad)


_CUDA_KERNELS: dict[tuple, str | None] = {}


@torch.compiler.assume_constant_result
def cuda_lse_kernel(
    device: torch.device, dtype: torch.dtype, head_dim: int, with_bias: bool, requires_grad: bool
) -> str | None:
    """:func:`lse_kernel`'s choice on CUDA, once per (device, dtype, head size, bias, grad).

    torch's dispatch checks (``torch.backends.cuda.can_use_flash_attention`` and
    ``can_use_efficient_attention``) run on small probe tensors of that dtype and head size, with
    a key bias laid out as :func:`kernel_bias` lays it out; the answer is cached. Those checks are
    C++ that dynamo cannot trace, so under ``torch.compile`` this function is a constant
    evaluated while tracing. What the checks read besides these keys (4-d inputs, a unit last
    stride, equal batch and head counts, no dropout, no causal mask) holds for every call here.
    """
    key = (device, dtype, head_dim, with_bias, requires_grad)
    if key not in _CUDA_KERNELS:
        _CUDA_KERNELS[key] = _probe_cuda_kernel(*key)
    return _CUDA_KERNELS[key]


def _probe_cuda_kernel(device, dtype, head_dim, with_bias, requires_grad) -> str | None:
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    with torch.inference_mode(False), torch.enable_grad():
        q = torch.zeros(1, 1, 16, head_dim, device=device, dtype=dtype,
                        requires_grad=requires_grad)  # fmt: skip
        if not with_bias and can_use_flash_attention(SDPAParams(q, q, q, None, 0.0, False, False)):
            return "flash"
        bias = kernel_bias(q.new_zeros(1, 16) if with_bias else None, dtype, 1, 16)
        ok = can_use_efficient_attention(SDPAParams(q, q, q, bias, 0.0, False, False))
    return "efficient" if ok else None


def kernel_bias(
    key_bias: torch.Tensor | None, dtype: torch.dtype, heads: int, n_q: int
) -> torch.Tensor | None:
    """(B, n) key bias as the (B, h, n_q, n) view that memory-efficient attention reads.

    Its rows are padded to a multiple of 16 elements in memory (the kernel's alignment, as
    ``F.scaled_dot_product_attention`` pads masks) and broadcast over heads and queries
    (stride 0), so no (B, h, n, n) tensor is materialised.
    """
    if key_bias is None:
        return None
    B, n = key_bias.shape
    buf = key_bias.new_zeros(B, -(-n // 16) * 16, dtype=dtype)
    buf[:, :n] = key_bias
    return buf[:, None, None, :n].expand(B, heads, n_q, n)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_bias: torch.Tensor | None = None,
    fused: bool = True,
    dropout_p: float = 0.0,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention that also returns the per-row log-sum-exp when a fused kernel exposes it.

    The fused kernels compute the row log-sum-exp anyway (see :func:`lse_kernel`); reusing it
    saves a pass in token scoring and lets :func:`reweighted_attention` read ``A[:, DC]`` off a
    few logits. The output is differentiable exactly as with ``F.scaled_dot_product_attention``;
    the log-sum-exp is not.

    Args:
        dropout_p: Attention dropout (pass 0 outside training); the log-sum-exp is then None.
        need_lse: Whether the caller uses the log-sum-exp. Without it CUDA runs
            ``F.scaled_dot_product_attention`` (torch picks the fastest kernel); CPU runs the same
            kernel either way.

    Returns:
        ``out`` (B, h, n, dv) and ``lse`` (B, h, n) float32 (float64 for float64 inputs), or
        None where no kernel exposes it (the explicit path, a value width other than q's,
        inputs that no CUDA kernel with a log-sum-exp accepts, attention dropout: the CPU flash
        kernel has none, so ``F.scaled_dot_product_attention`` then takes its math path) or
        CUDA does not need it.
    """
    kernel = lse_kernel(q, k, v, key_bias) if fused and dropout_p == 0.0 else None
    if kernel == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=_bias_4d(key_bias, q.dtype), scale=scale
        )
        return out, lse.to(torch.promote_types(q.dtype, torch.float32))
    if kernel is None or not need_lse:
        return attention(q, k, v, scale, key_bias, fused, dropout_p), None
    if kernel == "flash":
        out, lse, *_ = _CUDA_FLASH(q, k, v, 0.0, False, False, scale=scale)
        return out, lse
    bias = kernel_bias(key_bias, q.dtype, q.shape[1], q.shape[2])
    out, lse, *_ = _CUDA_EFFICIENT(q, k, v, bias, True, 0.0, False, scale=scale)
    return out, lse[..., : q.shape[2]]  # the kernel pads its rows to a multiple of 32


def _pad_width(num_dc: int) -> int:
    # Fused kernels want the same head size for q, k and v; CUDA kernels want multiples of 8.
    return -(-num_dc // 8) * 8


def reweighted_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    num_dc: int,
    coef_hp: torch.Tensor,
    coef_dc: torch.Tensor | None,
    key_bias: torch.Tensor | None = None,
    fused: bool = True,
    dropout_p: float = 0.0,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FATR's reweighted attention ``Â V`` in one attention call.

    ``Â = A_LP + coef_hp · A_HP + coef_dc · A_DC`` with ``A_LP = 11ᵀ/n``, ``A_HP = A - A_LP`` and
    ``A_DC`` the DC columns of ``A``. Expanding gives the exact identity

        ``Â V = coef_hp · A V - (coef_hp - 1) · mean_tokens(V) + coef_dc · A[:, DC] V[DC]``.

    ``A V`` and ``A[:, DC]`` come from ONE fused call. With gradients (training), the value tensor
    is extended along the head dim by the one-hot indicator of the DC tokens
    (``A · onehot = A[:, DC]``) and q, k are zero-padded to the same width, so the logits are
    unchanged; that costs ``n² · pad`` extra MACs (``pad`` = DC count, rounded up to 8 on CUDA)
    instead of another ``n² · d`` for ``V ⊙ mask``, and gradients flow through the fused kernel's
    backward. Without gradients, where a fused kernel exposes its row log-sum-exp (CPU's flash
    kernel; CUDA's flash or memory-efficient kernel, see :func:`lse_kernel`),
    ``A[:, DC] = exp(q k_DCᵀ · scale - lse)`` costs only ``n · num_dc · d`` MACs.
    ``A[:, DC] V[DC]`` is then a small ``(n × num_dc) · (num_dc × d)`` product.

    The DC tokens are the last ``num_dc`` tokens of the sequence. Keys removed by ``key_bias``
    (``-inf``: DC windows that hold no token yet, the only keys ever removed; with ``num_dc``
    0 every key counts) are left out of ``mean_tokens`` too.

    Attention dropout (``dropout_p``) drops entries of ``A`` itself, as in a plain ViT block:
    ``Â = A_LP + coef_hp · (Ã - A_LP) + coef_dc · Ã_DC`` with ``Ã`` the dropped (and rescaled)
    ``A``, which is plain attention dropout when the coefficients are 1 and 0. Both ``Ã V`` and
    ``Ã[:, DC]`` then come from the one-hot call, so they see the same dropped entries; the
    log-sum-exp shortcut would read the undropped ``A`` and is not used.

    Args:
        q, k, v: (B, h, n, d).
        scale: Logit scale.
        num_dc: Number of DC tokens at the end of the sequence (may be 0).
        coef_hp: ``1 + ω1`` per head, (h,).
        coef_dc: ``1 + ω2`` per head, (h,); None if the sequence never holds DC tokens
            (``num_dc`` must then be 0).
        key_bias: Optional additive bias per key, (B, n).
        fused: Use the fused kernel.
        dropout_p: Attention dropout (pass 0 outside training).
        need_lse: Whether the caller uses the log-sum-exp (see :func:`attention_with_lse`).

    Returns:
        ``Â V`` (B, h, n, d) and the row log-sum-exp of ``A`` (B, h, n) or None.
    """
    B, h, n, d = v.shape
    if coef_dc is None and num_dc:
        raise ValueError(f"{num_dc} DC tokens but no DC coefficient (coef_dc=None)")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, coef_hp, coef_dc)
    )
    lse_exposed = fused and lse_kernel(q, k, v, key_bias) is not None
    dc_term = None
    if num_dc > 0 and (needs_grad or not lse_exposed or dropout_p > 0.0):
        pad = num_dc if q.device.type == "cpu" else _pad_width(num_dc)
        onehot = v.new_zeros(n, pad)
        onehot[n - num_dc :, :num_dc] = torch.eye(num_dc, dtype=v.dtype, device=v.device)
        zeros = q.new_zeros(B, h, n, pad)
        out, lse = attention_with_lse(
            torch.cat([q, zeros], -1),
            torch.cat([k, zeros], -1),
            torch.cat([v, onehot.expand(B, h, n, pad)], -1),
            scale,
            key_bias,
            fused,
            dropout_p,
            need_lse,
        )
        av, a_dc = out[..., :d], out[..., d : d + num_dc]  # (B,h,n,d), (B,h,n,num_dc)
        dc_term = a_dc @ v[:, :, n - num_dc :]  # (B, h, n, d)
    else:
        av, lse = attention_with_lse(q, k, v, scale, key_bias, fused, dropout_p,
                                     need_lse or num_dc > 0)  # fmt: skip
        if num_dc > 0:
            k_dc = k[:, :, n - num_dc :]
            logits = float32_matmul(q, k_dc.transpose(-2, -1)).to(lse.dtype) * scale  # (B,h,n,D)
            if key_bias is not None:
                logits = logits + key_bias[:, None, None, n - num_dc :]
            a_dc = torch.exp(logits - lse[..., None]).to(v.dtype)
            dc_term = a_dc @ v[:, :, n - num_dc :]
    if key_bias is None or num_dc == 0:
        # Only a DC token (an empty window) is ever masked: a bias without DC tokens holds
        # log(size)s (proportional attention), and every key takes part in the mean.
        v_mean = v.mean(dim=2, keepdim=True)
    else:
        valid = (key_bias != float("-inf")).to(v.dtype)[:, None, :, None]  # (B, 1, n, 1)
        v_mean = (v * valid).sum(2, keepdim=True) / valid.sum(2, keepdim=True)
    # c · AV - (c - 1) · mean(V) = mean(V) + c · (AV - mean(V)): one lerp.
    out = torch.lerp(v_mean, av, coef_hp.to(v.dtype).view(1, h, 1, 1))
    if dc_term is not None:
        out = out + coef_dc.to(v.dtype).view(1, h, 1, 1) * dc_term
    return out, lse
