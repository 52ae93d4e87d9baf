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

from dataclasses import fields

import timm
import torch
from timm.layers import Attention as TimmVitAttention
from timm.layers import PatchEmbed, RotaryEmbeddingCat, resample_abs_pos_embed
from timm.models import eva as timm_eva
from timm.models import vision_transformer as timm_vit
from torch import nn

from ..ops.state import init_state
from .config import ReductionConfig
from .reducer import TokenReducer
from .restorer import TokenRestorer
from .timm_blocks import (
    _ATTN_CHILDREN,
    _ATTN_TENSORS,
    _BLOCK_PARTS,
    TimmAttention,
    TimmBlock,
    TimmTokenState,
    _adopt,
    _unknown_parts,
    reduce_with_prefix,
)
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
