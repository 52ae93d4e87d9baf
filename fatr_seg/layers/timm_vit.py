"""FATR on timm's own ViTs: a :class:`FATRVisionTransformer` whose weights are a timm model's.

``timm.create_model(model_name, **model_kwargs)`` builds a ``VisionTransformer`` (AugReg, DeiT-III,
DINOv2 with or without registers, ...) or an ``Eva`` (EVA-02: rotary embeddings, SwiGLU, sub-LN);
this module takes that model's parts (patch embedding, prefix tokens, positional embedding,
``norm_pre``, every block's norms, projections, q/k norms, LayerScale and MLP, the final norm) as
its own, under timm's names, and runs them in fatr_seg's reduction-aware forward: fused attention
that also returns the row log-sum-exp for the HF score, FATR's reweighting, the same
:class:`TokenReducer` between attention and MLP at the reduction layers, and restoration. timm's
code is called (its modules, ``resample_abs_pos_embed``, its RoPE module and
``apply_rot_embed_cat``, its checkpoint filters), never copied; only attention itself and the
block's order of operations are fatr_seg's.

Prefix tokens. timm puts ``P`` prefix tokens first (CLS, then registers; ``P = 0`` without a
class token). They attend and are attended to as in timm, but are never scored, merged or
restored. :class:`TokenReducer` reads the sequence as ``[one prefix token, patches, DC]``;
:func:`reduce_with_prefix` gives it that view exactly: the first ``P - 1`` prefix tokens are
held aside (their keys move behind the patches, so the HF score still takes every query row and
every key, and EViT's CLS attention stays CLS's), and with no prefix a masked placeholder token
stands at position 0 (its query row adds nothing to any score).

Rotary embeddings (EVA-02). A token's rotation is that of its grid cell in the patch grid of the
input: while nothing is reduced, exactly timm's. A merged token keeps its representative's
position, the kept token the others merged into (``TokenState.patch_idx``): exact for that
token, an approximation for the size-weighted mean it now is. Tokens without a cell (DC tokens,
EViT's fused token) are not rotated (angle 0), as timm leaves its prefix tokens unrotated.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmVitAttention
from timm.layers import PatchEmbed, RotaryEmbeddingCat, apply_rot_embed_cat, resample_abs_pos_embed
from timm.models import eva as timm_eva
from timm.models import vision_transformer as timm_vit
from torch import nn

from ..ops.attention import fused_attn_default
from ..ops.precision import float32_matmul
from ..ops.reduce import ReductionRecord
from ..ops.state import TokenState, init_state
from .attention import AttnStats, ReweightedCore
from .config import ReductionConfig
from .reducer import TokenReducer
from .restorer import TokenRestorer
from .vit import FATRVisionTransformer

__all__ = [
    "TimmAttention",
    "TimmBlock",
    "TimmFATRVisionTransformer",
    "TimmTokenState",
    "reduce_with_prefix",
]

# The timm classes this module runs, by role.
_MODELS = (timm_vit.VisionTransformer, timm_eva.Eva)
_BLOCKS = (timm_vit.Block, timm_eva.EvaBlock)
_ATTENTIONS = (TimmVitAttention, timm_eva.EvaAttention)
# Parts of a timm attention module that TimmAttention runs (anything else is refused).
_ATTN_CHILDREN = ("qkv", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "attn_drop", "norm",
                  "gate", "proj", "proj_drop")  # fmt: skip
_ATTN_TENSORS = ("q_bias", "k_bias", "v_bias")
_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2",
                "gamma_1", "gamma_2")  # fmt: skip
# create_model arguments the backbone sets itself.
_FIXED_KWARGS = {"pretrained": "give the weights as checkpoint=PATH (no download at build time)",
                 "dynamic_img_size": "it is always True: any input size works"}  # fmt: skip


def unsupported(model_name: str, what: str) -> ValueError:
    """The build-time error for a timm model this backbone cannot run, naming both."""
    return ValueError(
        f"timm model {model_name!r} is not supported by TimmFATRViT: {what}. TimmFATRViT runs "
        "plain ViTs, timm's VisionTransformer and Eva families (pre-norm blocks, one patch grid "
        "at one resolution, global attention)"
    )


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

    def forward(
        self,
        x: torch.Tensor,
        key_bias: torch.Tensor | None = None,
        num_dc: int = 0,
        return_stats: bool = False,
        rope: torch.Tensor | None = None,
        num_prefix: int = 1,
        coef_hp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttnStats | None]:
        """Attend over the whole sequence ``x`` (B, n, C).

        Args:
            key_bias: Optional (B, n) additive bias per key.
            num_dc: DC tokens at the end of the sequence.
            return_stats: Also return :class:`AttnStats` (q and k after RoPE: the logits'
                own) for token scoring.
            rope: (B or 1, 1, n - num_prefix, 2·d) rotary embedding of the tokens after the
                prefix, or None.
            num_prefix: Prefix tokens, which are not rotated (as in timm).
            coef_hp: The reweighting's ``1 + omega1`` if the caller computed it.

        Returns:
            ``(out (B, n, C), AttnStats or None)``.
        """
        B, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv_heads(x)
        if rope is not None:  # timm's rotation of every token after the prefix
            P, half = num_prefix, self.rotate_half
            q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], rope, half=half)], 2)
            k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope, half=half)], 2)
            q, k = q.type_as(v), k.type_as(v)
        out, stats = self.attend(q, k, v, key_bias, num_dc, return_stats, coef_hp)
        out = self.norm(out.transpose(1, 2).reshape(B, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out)), stats


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
        y, stats = self.attn(self.norm1(x), key_bias, state.num_dc, self.reducer is not None,
                             state.token_rope(), state.num_prefix, coef_hp)  # fmt: skip
        x = x + self.drop_path1(self.scale(y, 1))
        del y  # free the attention output and q, k before the MLP (see Block)
        record = None
        if self.reducer is not None:
            x, state, record = reduce_with_prefix(self.reducer, x, stats, state, key_bias)
        del stats
        x = x + self.drop_path2(self.scale(self.mlp(self.norm2(x)), 2))
        return x, state, record


def build_timm_model(model_name: str, model_kwargs: dict | None = None) -> nn.Module:
    """``timm.create_model`` with random weights, any input size, and no classifier.

    Raises:
        ValueError: A model this backbone cannot run (named, with what it lacks), or an
            argument it sets itself.
    """
    kwargs = dict(model_kwargs or {})
    for key, why in _FIXED_KWARGS.items():
        if key in kwargs and not (key == "dynamic_img_size" and kwargs[key] is True):
            raise ValueError(f"model_kwargs={{'{key}': {kwargs[key]!r}}} is not accepted: {why}")
    kwargs.pop("dynamic_img_size", None)
    if not timm.is_model(model_name):
        raise ValueError(f"timm has no model {model_name!r} (timm {timm.__version__})")
    defaults = dict(num_classes=0, dynamic_img_size=True, dynamic_img_pad=True)
    try:
        model = timm.create_model(model_name, pretrained=False, **{**defaults, **kwargs})
    except TypeError:
        # No dynamic image size: not one of the plain ViT classes. Name what it is.
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        if type(model) in _MODELS:
            raise
    check_timm_model(model_name, model)
    return model


def check_timm_model(model_name: str, model: nn.Module) -> None:
    """Raise :func:`unsupported` for a model whose structure this backbone cannot run."""
    kind = f"{type(model).__module__}.{type(model).__name__}"
    if type(model) not in _MODELS:
        if hasattr(model, "layers") or hasattr(model, "stages"):
            raise unsupported(model_name, f"it is hierarchical ({kind}: stages at several "
                              "resolutions, no single patch-token grid)")  # fmt: skip
        raise unsupported(model_name, f"it builds {kind}, not a VisionTransformer or Eva")
    if type(model.patch_embed) is not PatchEmbed:
        stem = type(model.patch_embed).__name__
        raise unsupported(model_name, f"its patch embedding is {stem} (a CNN stem, hybrid "
                          "model); TimmFATRViT needs timm's plain PatchEmbed")  # fmt: skip
    ph, pw = model.patch_embed.patch_size
    if ph != pw:
        raise unsupported(model_name, f"non-square patches {ph}x{pw}")
    if getattr(model, "patch_drop", None) is not None and not isinstance(
        model.patch_drop, nn.Identity
    ):
        raise unsupported(model_name, "patch_drop_rate > 0 drops patches at random, which "
                          "leaves no full grid to restore; use patch_drop_rate=0")  # fmt: skip
    rope = getattr(model, "rope", None)
    if rope is not None and type(rope) is not RotaryEmbeddingCat:
        raise unsupported(model_name, f"its rotary embedding is {type(rope).__name__}; only "
                          "EVA-02's RotaryEmbeddingCat (rope_type='cat') is run")  # fmt: skip
    if rope is not None and getattr(rope, "aug_active", False):
        raise unsupported(model_name, "RoPE coordinate augmentation (rope_shift_coords, "
                          "rope_jitter_coords, rope_rescale_coords) is not supported")  # fmt: skip
    for i, blk in enumerate(model.blocks):
        if type(blk) not in _BLOCKS:
            raise unsupported(model_name, f"block {i} is {type(blk).__name__}; TimmFATRViT "
                              "runs pre-norm Block (ViT) and EvaBlock (Eva)")  # fmt: skip
        if type(blk.attn) not in _ATTENTIONS:
            raise unsupported(model_name, f"block {i}'s attention is {type(blk.attn).__name__}; "
                              "TimmFATRViT runs timm's Attention and EvaAttention")  # fmt: skip
        extra = _unknown_parts(blk.attn, _ATTN_CHILDREN + _ATTN_TENSORS)
        extra += _unknown_parts(blk, _BLOCK_PARTS)
        if extra:
            raise unsupported(model_name, f"block {i} has parts TimmFATRViT does not run: {extra}")


class TimmFATRVisionTransformer(FATRVisionTransformer):
    """FATR on a timm ``VisionTransformer`` or ``Eva``: its weights, fatr_seg's forward.

    The state-dict keys are timm's (``patch_embed.proj.weight``, ``cls_token``, ``reg_token``,
    ``pos_embed``, ``blocks.N.attn.qkv.weight``, ``blocks.N.ls1.gamma``, ``blocks.N.gamma_1``,
    ``norm.weight`` ...) plus the reduction's own (``blocks.N.attn.omega1``/``omega2``,
    ``blocks.N.reducer.dc_pos``), so a timm checkpoint loads strictly. The classifier
    (``head``, ``fc_norm`` unless used as the final norm, ``attn_pool``) is not kept.

    Forward, outputs, ``set_keep_ratio`` and ``reduction_trace`` are
    :class:`FATRVisionTransformer`'s; the embedding (timm's patch embedding, prefix tokens and
    positional embedding resampled to the input's grid by timm's ``resample_abs_pos_embed``,
    ``norm_pre``; EVA-02's rotary embedding for the grid) and the blocks are timm's weights. With
    ``reduction=None`` the output of the last block equals timm's ``forward_features`` patch
    tokens.

    Args:
        model_name: A timm model name, e.g. ``'vit_small_patch14_reg4_dinov2'``,
            ``'eva02_small_patch14_224'``; built with random weights (``pretrained=False``).
        model_kwargs: More arguments of ``timm.create_model`` (``img_size``, ``depth``,
            ``class_token``, ``drop_path_rate`` ...). The model is always built with
            ``dynamic_img_size=True`` (any input size); ``dynamic_img_pad=True`` (an input
            that is no multiple of the patch size is padded at the bottom and right) and
            ``num_classes=0`` unless given.
        out_indices: 0-indexed blocks whose outputs are returned.
        reduction: Reduction config dict (see :class:`ReductionConfig`), None for none.
        compact_output: Return :class:`CompactTokens` (see :class:`FATRVisionTransformer`).
        final_norm: Applied to the last block's output: True, the model's ``norm`` (what
            ``forward_features`` applies; an ``Identity`` in timm's average-pooling models);
            ``'fc_norm'``, the classifier's norm of an average-pooling model, applied per
            token; False, none.
        output_cls_token: Return ``[map, cls_token]`` per output (needs a class token).
        out_origin: Also return the embedded input first.
        check_finite: Reject inputs with NaN or Inf (see :class:`FATRVisionTransformer`).
        fused_attn: Use the fused kernel (None reads ``FATR_FUSED_ATTN``).
        with_cp: Gradient checkpointing per block in training.
        antialias: How the positional embedding is resampled to another grid (bicubic, by
            timm's ``resample_abs_pos_embed``, on loading and for each input): antialiased as
            timm's own forward does (True), or not, as mmseg and :class:`FATRVisionTransformer`
            do (False: a ViT checkpoint then gives exactly ``FATRViT``'s features at every input
            size).

    Raises:
        ValueError: A model that is not a plain ViT (a hybrid CNN stem, a hierarchical model,
            another block type), or an argument that cannot be honoured, naming it.
    """

    def __init__(
        self,
        model_name: str,
        model_kwargs: dict | None = None,
        out_indices: int | tuple[int, ...] = -1,
        reduction: dict | None = None,
        compact_output: bool = False,
        final_norm: bool | str = True,
        output_cls_token: bool = False,
        out_origin: bool = False,
        check_finite: bool = True,
        fused_attn: bool | None = None,
        with_cp: bool = False,
        antialias: bool = True,
    ) -> None:
        # FATRVisionTransformer's __init__ builds its own weights: skip it, keep the rest of
        # the chain (nn.Module, and mmengine's BaseModule in the registered backbone).
        super(FATRVisionTransformer, self).__init__()
        model = build_timm_model(model_name, model_kwargs)
        self.model_name = model_name
        self.check_finite = check_finite
        self.compact_output = compact_output
        self.with_cp = with_cp
        self.out_origin = out_origin
        self.patch_size = model.patch_embed.patch_size[0]
        self.embed_dims = model.embed_dim
        self.num_layers = len(model.blocks)
        self._num_prefix_tokens = model.num_prefix_tokens
        self.no_embed_class = model.no_embed_class
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        self.timm_module = type(model).__module__
        self.pos_grid = tuple(model.patch_embed.grid_size)
        self.interpolate_mode = "bicubic"
        self.antialias = antialias
        n = self.num_layers
        out_indices = (out_indices,) if isinstance(out_indices, int) else tuple(out_indices)
        if any(not -n <= i < n for i in out_indices):
            raise ValueError(f"out_indices={out_indices} out of range for {n} layers")
        self.out_indices = tuple(sorted({i % n for i in out_indices}))
        if not (self.out_indices or out_origin):
            raise ValueError("out_indices=() returns nothing: give a block (or out_origin=True)")
        self.reduction = red = ReductionConfig.from_dict(reduction, depth=n)
        if compact_output and red and red.restore != "copy":
            raise ValueError(
                f"compact_output=True needs reduction restore='copy' (got {red.restore!r})"
            )
        has_cls = getattr(model, "cls_token", None) is not None
        if red and not has_cls and "cls" in red.score:
            raise ValueError(
                f"reduction score 'cls' (EViT) reads the CLS token's attention, and {model_name} "
                "has no class token: choose another score"
            )
        if output_cls_token and not has_cls:
            raise ValueError(f"output_cls_token=True needs a class token; {model_name} has none")
        if output_cls_token and compact_output:
            raise ValueError("output_cls_token=True needs compact_output=False")
        self.with_cls_token = has_cls
        self.output_cls_token = output_cls_token
        if final_norm not in (True, False, "fc_norm"):
            raise ValueError(f"final_norm={final_norm!r} is invalid: True, False or 'fc_norm'")
        if final_norm == "fc_norm" and isinstance(getattr(model, "fc_norm", None), nn.Identity):
            raise ValueError(f"final_norm='fc_norm': {model_name} has no fc_norm (it pools "
                             "with 'token'); use final_norm=True")  # fmt: skip
        self.final_norm = bool(final_norm)

        _adopt(self, model, ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop",
                             "norm_pre", "norm"))  # fmt: skip
        self.rope = getattr(model, "rope", None)
        if final_norm == "fc_norm":
            self.fc_norm = model.fc_norm
        first = red.layers[0] - 1 if red else n
        dc_terms = bool(red) and "dc" in red.aggregate
        blocks = []
        for i, blk in enumerate(model.blocks):
            j = red.index(i) if red else None
            reducer = None if j is None else TokenReducer(red, j, self.embed_dims)
            reweight = red.reweight if (red and i > first) else None
            blocks.append(TimmBlock(blk, reducer, reweight, dc_terms, fused_attn))
        self.blocks = nn.ModuleList(blocks)
        self.restorer = TokenRestorer(red.restore if red else "copy")

    @property
    def num_prefix_tokens(self) -> int:
        """P, the tokens before the patches: CLS and registers (timm's ``num_prefix_tokens``)."""
        return self._num_prefix_tokens

    def final_norm_module(self) -> nn.Module | None:
        """The norm applied to the last block's output (timm's ``norm``, or ``fc_norm``), or
        None."""
        if not self.final_norm:
            return None
        fc_norm = getattr(self, "fc_norm", None)
        return self.norm if fc_norm is None else fc_norm

    def interpolate_pos_embed(self, hw_shape: tuple[int, int]) -> torch.Tensor | None:
        """timm's positional embedding for a (H, W) patch grid (timm's resampling), or None."""
        if self.pos_embed is None:
            return None
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        return resample_abs_pos_embed(
            self.pos_embed, new_size=hw_shape, old_size=self.pos_grid, num_prefix_tokens=prefix,
            antialias=self.antialias,
        )  # fmt: skip

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, TimmTokenState]:
        """Embed ``x`` (B, 3, H, W) as timm does: (B, P + N, C) and the initial state."""
        self.check_input(x)
        tokens = self.patch_embed(x)  # (B, H, W, C): dynamic image size
        B, H, W, C = tokens.shape
        tokens = tokens.reshape(B, H * W, C)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        pos = self.interpolate_pos_embed((H, W))
        if pos is not None and self.no_embed_class:
            tokens = tokens + pos  # the prefix tokens have no positional embedding
        tokens = torch.cat([*prefix, tokens], dim=1) if prefix else tokens
        if pos is not None and not self.no_embed_class:
            tokens = tokens + pos
        tokens = self.norm_pre(self.pos_drop(tokens))
        rope = None if self.rope is None else self.rope.get_embed(shape=(H, W))
        base = init_state(B, (H, W), tokens.device)
        state = TimmTokenState(**{f.name: getattr(base, f.name) for f in fields(base)},
                               num_prefix=self.num_prefix_tokens, rope=rope)  # fmt: skip
        return tokens, state

    def timm_checkpoint_filter(self, state_dict: dict) -> dict:
        """timm's own key filtering for this model's family (original-format keys converted,
        the positional embedding resampled to this model's grid, a patch embedding of another
        patch size resampled), then the classifier's keys, which this backbone does not keep,
        dropped."""
        module = timm_eva if self.timm_module == timm_eva.__name__ else timm_vit
        state = module.checkpoint_filter_fn(state_dict, self, antialias=self.antialias)
        own = self.state_dict()
        drop = ("head.", "head_drop.", "attn_pool.", "fc_norm.")
        return {k: v for k, v in state.items() if k in own or not k.startswith(drop)}
