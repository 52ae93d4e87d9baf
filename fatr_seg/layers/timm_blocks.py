"""timm's blocks in fatr_seg's forward: the state of a sequence with prefix tokens, the reducer
run around them, and timm's attention and block modules on fused attention with the reduction.

Used by :class:`fatr_seg.layers.TimmFATRVisionTransformer` (see :mod:`.timm_vit` for prefix
tokens and rotary embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from torch import nn

from ..ops.attention import fused_attn_default
from ..ops.precision import float32_matmul
from ..ops.reduce import ReductionRecord
from ..ops.state import TokenState
from .attention import AttnStats, ReweightedCore
from .reducer import TokenReducer

__all__ = ["TimmAttention", "TimmBlock", "TimmTokenState", "reduce_with_prefix"]

# Parts of a timm attention module that TimmAttention runs (anything else is refused).
_ATTN_CHILDREN = ("qkv", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "attn_drop", "norm",
                  "gate", "proj", "proj_drop")  # fmt: skip
_ATTN_TENSORS = ("q_bias", "k_bias", "v_bias")
_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2",
                "gamma_1", "gamma_2")  # fmt: skip


@dataclass(frozen=True)
class TimmTokenState(TokenState):
    """:class:`TokenState` of a sequence ``[P prefix tokens, patches (M), DC (D)]``.

    The reduction steps copy a state with ``replace``, so these fields travel with it.

    Attributes:
        num_prefix: P, the prefix tokens (CLS and registers) before the patches.
        rope: (N, 2·d) timm's rotary embedding (sin and cos, concatenated) of every cell of the
            input's patch grid, or None for a model without rotary embeddings.
    """

    num_prefix: int = 1
    rope: torch.Tensor | None = None

    def key_bias(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Additive attention bias per key, (B, P + M + D), or None (see :class:`TokenState`)."""
        bias = super().key_bias(dtype)  # (B, 1 + M + D): one prefix position
        if bias is None or self.num_prefix == 1:
            return bias
        prefix = bias.new_zeros(bias.shape[0], self.num_prefix)
        return torch.cat([prefix, bias[:, 1:]], dim=1)

    def token_rope(self) -> torch.Tensor | None:
        """(B, 1, M + D, 2·d) rotary embedding of every non-prefix token, or None.

        A patch token takes its grid cell's (for a merged token: its representative's); DC
        tokens and tokens without a cell take angle 0 (sin 0, cos 1: no rotation).
        """
        if self.rope is None:
            return None
        N, two_d = self.rope.shape
        no_turn = torch.cat([self.rope.new_zeros(two_d // 2), self.rope.new_ones(two_d // 2)])
        table = torch.cat([self.rope, no_turn[None]])  # (N + 1, 2d), row N: no rotation
        idx = torch.where(self.patch_idx >= 0, self.patch_idx, N)
        if self.num_dc:
            idx = torch.cat([idx, idx.new_full((idx.shape[0], self.num_dc), N)], dim=1)
        return table[idx][:, None]


def _row_lse(stats: AttnStats, key_bias: torch.Tensor | None) -> torch.Tensor:
    """(B, h, n) row log-sum-exp of the attention logits, where the kernel did not return it."""
    dtype = torch.promote_types(stats.q.dtype, torch.float32)
    logits = float32_matmul(stats.q.to(dtype), stats.k.to(dtype).transpose(-2, -1)) * stats.scale
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :].to(dtype)
    return logits.logsumexp(dim=-1)


def reduce_with_prefix(
    reducer: TokenReducer,
    x: torch.Tensor,
    stats: AttnStats,
    state: TimmTokenState,
    key_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, TimmTokenState, ReductionRecord]:
    """Run ``reducer`` on ``x`` (B, P + M + D, C), whose P prefix tokens it must not touch.

    :class:`TokenReducer` takes the sequence as ``[one prefix token, patches, DC]``. Here it gets
    that view with the scores of the whole sequence:

    * P = 1: the sequence as it is.
    * P > 1: the tokens from the last prefix token on, so the first P - 1 stay aside untouched.
      The keys (and their bias) are reordered ``[last prefix, patches, other prefix tokens,
      DC]``; the queries keep every row in order (row 0 is CLS). Every score is then the one
      the whole sequence gives: the HF score's column mean over every query row with the
      softmax over every key, EViT's CLS attention over every key.
    * P = 0: a placeholder token is put first, with a zero query and key, its key masked
      (``-inf``) and its query row's log-sum-exp ``+inf``, so it receives and gives no
      attention in any score; it is dropped again afterwards.

    Args:
        reducer: The block's reduction.
        x: The sequence after the attention sub-block.
        stats: That attention's statistics over the whole sequence.
        state: The sequence's state.
        key_bias: That attention's key bias (B, P + M + D), or None.

    Returns:
        The reduced sequence (B, P + M' + D', C), its state and the reducer's record.
    """
    P, M = state.num_prefix, state.num_patches
    if P == 1:
        return reducer(x, stats, state, key_bias)
    B, n, C = x.shape
    if P > 1:
        dev = x.device
        order = torch.cat([torch.arange(P - 1, P + M, device=dev), torch.arange(P - 1, device=dev),
                           torch.arange(P + M, n, device=dev)])  # fmt: skip
        view = stats._replace(k=stats.k.index_select(2, order))
        bias = None if key_bias is None else key_bias.index_select(1, order)
        y, state, record = reducer(x[:, P - 1 :], view, state, bias)
        return torch.cat([x[:, : P - 1], y], dim=1), state, record
    lse = _row_lse(stats, key_bias) if stats.lse is None else stats.lse
    h, d = stats.q.shape[1], stats.q.shape[3]
    zero = stats.q.new_zeros(B, h, 1, d)
    view = AttnStats(
        torch.cat([zero, stats.q], dim=2),
        torch.cat([zero, stats.k], dim=2),
        stats.scale,
        torch.cat([lse.new_full((B, h, 1), float("inf")), lse], dim=2),
    )
    bias = key_bias if key_bias is not None else x.new_zeros(B, n, dtype=torch.float32)
    bias = torch.cat([bias.new_full((B, 1), float("-inf")), bias], dim=1)
    y, state, record = reducer(torch.cat([x.new_zeros(B, 1, C), x], dim=1), view, state, bias)
    return y[:, 1:], state, record


def _adopt(dst: nn.Module, src: nn.Module, names: tuple[str, ...]) -> None:
    """Make ``src``'s children, parameters and buffers called ``names`` ``dst``'s, same names."""
    persistent = set(src.state_dict(keep_vars=True))
    for name in names:
        if name in src._modules:
            dst.add_module(name, src._modules[name])
        elif name in src._parameters:
            dst.register_parameter(name, src._parameters[name])
        elif name in src._buffers:
            dst.register_buffer(name, src._buffers[name], persistent=name in persistent)
        else:  # absent, or None in this model (e.g. no register tokens, no q bias)
            setattr(dst, name, None)


def _unknown_parts(module: nn.Module, known: tuple[str, ...]) -> list[str]:
    parts = [*module._modules, *module._parameters, *module._buffers]
    return [p for p in parts if p not in known and getattr(module, p, None) is not None]


class TimmAttention(ReweightedCore):
    """A timm attention's weights (ViT ``Attention`` or ``EvaAttention``) on fused attention.

    The projections (fused ``qkv``, or Eva's ``q_proj``/``k_proj``/``v_proj`` and its
    ``q_bias``/``v_bias``), ``q_norm``/``k_norm``, the inner norm (EVA-02's sub-LN,
    ``norm``), the gate and ``proj`` are timm's modules, under timm's names. Attention itself is
    :func:`fatr_seg.ops.attention_with_lse` (or :func:`fatr_seg.ops.reweighted_attention`
    after the first reduction layer), with a key bias and the row log-sum-exp for scoring, as
    :class:`fatr_seg.layers.Attention`.

    Args:
        attn: The timm attention module (its parts are taken over, not copied).
        reweight: FATR's reweighting of this block (see :class:`fatr_seg.layers.Attention`).
        dc_terms: Whether the sequence can hold DC tokens (creates ``omega2``).
        fused_attn: Use the fused kernel; None reads ``FATR_FUSED_ATTN``.
    """

    def __init__(
        self,
        attn: nn.Module,
        reweight: str | None = None,
        dc_terms: bool = True,
        fused_attn: bool | None = None,
    ) -> None:
        super().__init__()
        _adopt(self, attn, _ATTN_CHILDREN + _ATTN_TENSORS)
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self.attn_dim = attn.num_heads * attn.head_dim
        self.attn_drop_p = float(attn.attn_drop.p)
        self.qkv_bias_separate = bool(getattr(attn, "qkv_bias_separate", False))
        self.rotate_half = bool(getattr(attn, "rotate_half", False))
        self.fused_attn = fused_attn_default() if fused_attn is None else fused_attn
        self.init_reweight(self.num_heads, reweight, dc_terms)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, h, n, d) of ``x`` (B, n, C), q/k norms applied, as timm computes them."""
        B, n, _ = x.shape
        if self.qkv is None:  # Eva's separate projections
            q, k, v = (proj(x).reshape(B, n, self.num_heads, -1).transpose(1, 2)
                       for proj in (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        else:
            if getattr(self, "q_bias", None) is None:
                qkv = self.qkv(x)
            else:  # Eva: q and v biases, k has none
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                qkv = (self.qkv(x) + bias if self.qkv_bias_separate
                       else F.linear(x, self.qkv.weight, bias))  # fmt: skip
            q, k, v = qkv.reshape(B, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def heads(self, x: torch.Tensor, rope: torch.Tensor | None = None, num_prefix: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """q, k, v (B, h, n, d) as timm computes them, RoPE applied to every token after the
        ``num_prefix`` prefix tokens (which timm leaves unrotated)."""
        q, k, v = self.qkv_heads(x)
        if rope is not None:
            P, half = num_prefix, self.rotate_half
            q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], rope, half=half)], 2)
            k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope, half=half)], 2)
            q, k = q.type_as(v), k.type_as(v)
        return q, k, v

    def output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """timm's inner norm, gate (from the block's input ``x``) and projection of ``out``."""
        out = self.norm(out)
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))


class TimmBlock(nn.Module):
    """A timm pre-norm block (ViT ``Block`` or ``EvaBlock``) with the reduction between
    attention and MLP, as :class:`fatr_seg.layers.Block`.

    timm's parts keep their names: ``norm1``, ``attn`` (a :class:`TimmAttention`), ``ls1``/``ls2``
    (ViT's LayerScale) or ``gamma_1``/``gamma_2`` (Eva's), ``drop_path1``/``drop_path2``,
    ``norm2``, ``mlp`` (``Mlp``, ``SwiGLU``, ``GluMlp``, with EVA-02's sub-LN inside).

    Args:
        block: The timm block (its parts are taken over).
        reducer: This block's reduction, or None.
        reweight, dc_terms, fused_attn: See :class:`TimmAttention`.
    """

    def __init__(
        self,
        block: nn.Module,
        reducer: TokenReducer | None = None,
        reweight: str | None = None,
        dc_terms: bool = True,
        fused_attn: bool | None = None,
    ) -> None:
        super().__init__()
        _adopt(self, block, tuple(p for p in _BLOCK_PARTS if p != "attn"))
        self.attn = TimmAttention(block.attn, reweight, dc_terms, fused_attn)
        self.reducer = reducer

    def scale(self, y: torch.Tensor, which: int) -> torch.Tensor:
        """The branch output ``y`` times LayerScale ``which`` (1: attention, 2: MLP), if any."""
        ls = getattr(self, f"ls{which}", None)
        if ls is not None:
            return ls(y)
        gamma = getattr(self, f"gamma_{which}", None)
        return y if gamma is None else gamma * y

    def forward(
        self, x: torch.Tensor, state: TimmTokenState, coef_hp: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, TimmTokenState, ReductionRecord | None]:
        """Run the block on ``x`` (B, P + M + D, C); returns the (possibly reduced) sequence."""
        key_bias = state.key_bias(torch.float32)
        reduces = self.reducer is not None and self.reducer.active
        y, stats = self.attn(self.norm1(x), key_bias, state.num_dc, reduces, coef_hp,
                             state.token_rope(), state.num_prefix)  # fmt: skip
        x = x + self.drop_path1(self.scale(y, 1))
        del y  # free the attention output and q, k before the MLP (see Block)
        record = None
        if reduces:
            x, state, record = reduce_with_prefix(self.reducer, x, stats, state, key_bias)
        del stats
        x = x + self.drop_path2(self.scale(self.mlp(self.norm2(x)), 2))
        return x, state, record
