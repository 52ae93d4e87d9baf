"""Multi-head self-attention with timm's parameter names and FATR's optional reweighting."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..ops.attention import attention_with_lse, fused_attn_default, reweighted_attention

__all__ = ["Attention", "AttnStats", "ReweightedCore", "hp_coefficients"]


class AttnStats(NamedTuple):
    """Detached attention statistics for token scoring.

    Attributes:
        q: (B, h, n, d) queries.
        k: (B, h, n, d) keys.
        scale: Logit scale.
        lse: (B, h, n) row log-sum-exp of the plain attention logits, or None if the kernel did
            not expose it.
    """

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    lse: torch.Tensor | None


class ReweightedCore(nn.Module):
    """The attention call of a block, FATR's reweighting (``omega1``, ``omega2``) and its stats.

    Shared by :class:`Attention` and :class:`fatr_seg.layers.timm_blocks.TimmAttention`, which
    differ only in how they project the tokens to q, k, v (:meth:`heads`) and back
    (:meth:`output`). A subclass sets ``num_heads``, ``scale``, ``fused_attn`` and the attention
    dropout ``attn_drop_p`` and calls :meth:`init_reweight`.
    """

    def forward(
        self,
        x: torch.Tensor,
        key_bias: torch.Tensor | None = None,
        num_dc: int = 0,
        return_stats: bool = False,
        coef_hp: torch.Tensor | None = None,
        rope: torch.Tensor | None = None,
        num_prefix: int = 1,
    ) -> tuple[torch.Tensor, AttnStats | None]:
        """Attend over the whole sequence ``x`` (B, n, C).

        Args:
            key_bias: Optional (B, n) additive bias per key.
            num_dc: Number of DC tokens at the end of the sequence.
            return_stats: Also return detached :class:`AttnStats` (q and k as the logits see
                them, after any rotation) for token scoring.
            coef_hp: ``1 + omega1``, computed by the caller for all blocks at once, or None.
            rope: (B or 1, 1, n - num_prefix, 2·d) rotary embedding of the tokens after the
                prefix, or None (only for a subclass that rotates).
            num_prefix: Prefix tokens, which are not rotated.

        Returns:
            ``(out (B, n, C), AttnStats or None)``.
        """
        q, k, v = self.heads(x, rope, num_prefix)
        out, stats = self.attend(q, k, v, key_bias, num_dc, return_stats, coef_hp)
        return self.output(out.transpose(1, 2).flatten(2), x), stats

    def init_reweight(self, num_heads: int, reweight: str | None, dc_terms: bool) -> None:
        """Create FATR's per-head parameters for ``reweight`` (see :class:`Attention`)."""
        self.reweight = reweight
        if reweight is not None:
            self.omega1 = nn.Parameter(torch.zeros(num_heads))
            self._omega1_zero = (None, None, False)  # (data_ptr, version, omega1 == 0)
            if dc_terms:
                omega2_init = 0.0 if reweight == "identity" else 1.0
                self.omega2 = nn.Parameter(torch.full((num_heads,), omega2_init))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_bias: torch.Tensor | None,
        num_dc: int,
        return_stats: bool,
        coef_hp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttnStats | None]:
        """``(B, h, n, d)`` attention output (reweighted where the block reweights) and, with
        ``return_stats``, the detached :class:`AttnStats` for token scoring. ``coef_hp`` is
        ``1 + omega1`` when the caller computed it (see :func:`hp_coefficients`)."""
        drop = self.attn_drop_p if self.training else 0.0
        if self.reweight is None or (num_dc == 0 and self.hp_is_identity()):
            out, lse = attention_with_lse(q, k, v, self.scale, key_bias, self.fused_attn, drop,
                                          need_lse=return_stats)  # fmt: skip
        else:
            coef_hp = 1 + self.omega1 if coef_hp is None else coef_hp
            out, lse = reweighted_attention(
                q, k, v, self.scale, num_dc, coef_hp, getattr(self, "omega2", None),
                key_bias, self.fused_attn, drop, need_lse=return_stats,
            )  # fmt: skip
        if not return_stats:
            return out, None
        lse = None if lse is None else lse.detach()
        return out, AttnStats(q.detach(), k.detach(), self.scale, lse)

    def hp_is_identity(self) -> bool:
        """Whether ``1 + omega1`` is known to be exactly 1 with no gradient to carry: the
        high-pass reweighting is then plain attention, and skipping it saves a token mean and a
        lerp (two passes over the values) per block, e.g. for a reduction applied to the weights
        of an unreduced model.

        Only in eval mode, and never reading a tensor on the host: ``eval()``, moving an
        eval-mode module (``.to()``) and loading a state dict read ``omega1``
        (:meth:`read_omega1`), and the forward trusts that reading only while ``omega1`` keeps
        its storage and version (a write through ``.data``, as mmengine's EMA swap, bypasses the
        version: call ``eval()`` after one, as mmengine's loops do). A compiled forward does not
        skip; :class:`fatr_seg.models.cuda_graph.CUDAGraphForward` keys its graphs on it.
        """
        w = self.omega1
        if self.training or torch.compiler.is_compiling():
            return False
        if (w.requires_grad and torch.is_grad_enabled()) or w.is_inference():
            return False  # a gradient needs the path; an inference tensor has no version
        return self._omega1_zero == (w.data_ptr(), w._version, True)

    def read_omega1(self) -> None:
        """Read whether ``omega1`` is all zero, for :meth:`hp_is_identity` (one host read)."""
        w = self.omega1
        if w.is_inference() or w.is_meta:
            self._omega1_zero = (None, None, False)
        else:
            self._omega1_zero = (w.data_ptr(), w._version, bool((w == 0).all()))

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode and self.reweight is not None and not torch.compiler.is_compiling():
            self.read_omega1()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self.reweight is not None:
            self.read_omega1()

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(): new storage
        super()._apply(fn, *args, **kwargs)
        if self.reweight is not None and not self.training:
            self.read_omega1()
        return self


def hp_coefficients(attns: list[nn.Module]) -> list[torch.Tensor | None]:
    """``1 + omega1`` of every reweighting attention in ``attns`` (None for the others and where
    the reweighting is the identity, see :meth:`ReweightedCore.hp_is_identity`).

    One ``_foreach_add`` for all of them: one kernel on CUDA instead of one per block.
    """
    # A block with DC terms keeps the reweighted call (its DC term) whatever omega1 is.
    used = [a.reweight is not None and (hasattr(a, "omega2") or not a.hp_is_identity())
            for a in attns]  # fmt: skip
    omegas = [a.omega1 for a, u in zip(attns, used) if u]
    coefs = iter(torch._foreach_add(omegas, 1.0) if omegas else ())
    return [next(coefs) if u else None for u in used]


class Attention(ReweightedCore):
    """timm-compatible attention (``qkv``, ``proj``) on the fused kernel.

    With ``reweight`` set it computes FATR's ``Â V`` (see
    :func:`fatr_seg.ops.reweighted_attention`) with learnable per-head ``omega1`` (ω1) and, when
    the sequence can hold DC tokens, ``omega2``: ``Â = A_LP + (1 + ω1) A_HP + (1 + ω2) A_DC``.

    ``omega2`` is stored shifted by one: the parameter is ``1 + ω2``, the extra weight of the DC
    columns, so 0 is plain attention and weight decay pulls towards it (not towards the paper's
    doubled DC columns).

    * ``'identity'`` initialises ω1 = 0 and ``omega2`` = 0 (ω2 = -1): the block starts as plain
      attention, so a pretrained model is reproduced before fine-tuning.
    * ``'paper'`` initialises ω1 = 0 and ``omega2`` = 1 (ω2 = 0), the paper's literal formula
      (DC columns count twice).

    Args:
        dim: Embedding dim C.
        num_heads: Heads h.
        qkv_bias: Bias on the qkv projection.
        attn_drop: Dropout on the attention probabilities in training (``dropout_p`` of the
            fused kernel; see :func:`fatr_seg.ops.reweighted_attention` for the reweighted form).
        proj_drop: Dropout after the output projection.
        proj_bias: Bias on the output projection.
        reweight: None, ``'identity'`` or ``'paper'``.
        dc_terms: Whether the sequence can hold DC tokens (creates ``omega2``).
        fused_attn: Use the fused kernel; None reads ``FATR_FUSED_ATTN``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        reweight: str | None = None,
        dc_terms: bool = True,
        fused_attn: bool | None = None,
        proj_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"attn_drop={attn_drop} is invalid: a probability in [0, 1)")
        self.attn_drop = float(attn_drop)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn_default() if fused_attn is None else fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.init_reweight(num_heads, reweight, dc_terms)

    @property
    def attn_drop_p(self) -> float:
        return self.attn_drop

    def heads(self, x: torch.Tensor, rope: torch.Tensor | None = None, num_prefix: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """q, k, v (B, h, n, d) of ``x`` (B, n, C)."""
        if rope is not None:
            raise ValueError("Attention has no rotary embedding: pass rope=None")
        B, n, C = x.shape
        qkv = self.qkv(x).reshape(B, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block's output from the heads' ``out`` (B, n, C)."""
        return self.proj_drop(self.proj(out))
