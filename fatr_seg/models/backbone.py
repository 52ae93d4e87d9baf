"""``FATRViT``: the registered mmseg backbone, a drop-in for mmseg's ``VisionTransformer``."""

from __future__ import annotations

import functools
import logging

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import nn

from ..layers.vit import FATRVisionTransformer
from .convert import (
    FATR_ONLY,
    CheckpointError,
    convert_state_dict,
    load_checkpoint_file,
    load_state_strict,
    mmseg_name,
    resize_pos_embed,
)

__all__ = ["ACT_TYPES", "FATRViT", "NORM_KEYS"]

#: ``act_cfg`` types FATRViT builds (mmcv's names), and the torch modules they are.
ACT_TYPES = {"GELU": nn.GELU, "ReLU": nn.ReLU, "SiLU": nn.SiLU}
#: The keys ``norm_cfg`` may hold: every norm of the backbone is a LayerNorm.
NORM_KEYS = ("type", "eps", "requires_grad")
# Checkpoint keys of parts a backbone can be built without, and the argument that removes them.
# mmseg's VisionTransformer loads non-strictly and so ignores them; so does FATRViT, loudly.
_OPTIONAL_PARTS = {
    "norm.": "final_norm=False",
    "norm_pre.": "pre_norm=False",
    "patch_embed.norm.": "patch_norm=False",
    "patch_embed.proj.bias": "patch_bias=False",
}


def norm_from_cfg(norm_cfg: dict) -> tuple[float, bool]:
    """mmcv's ``norm_cfg`` for a LayerNorm -> ``(eps, requires_grad)`` (mmcv's eps: 1e-5)."""
    ok = isinstance(norm_cfg, dict) and norm_cfg.get("type") in ("LN", nn.LayerNorm)
    if not ok:
        raise ValueError(
            f"norm_cfg={norm_cfg!r} is not supported: FATRViT's norms are LayerNorms, give "
            "norm_cfg=dict(type='LN', eps=..., requires_grad=...)"
        )
    unknown = sorted(set(norm_cfg) - set(NORM_KEYS))
    if unknown:
        raise ValueError(f"norm_cfg has unsupported key(s) {unknown}: allowed are {NORM_KEYS}")
    return float(norm_cfg.get("eps", 1e-5)), bool(norm_cfg.get("requires_grad", True))


def act_from_cfg(act_cfg: dict):
    """mmcv's ``act_cfg`` -> a factory of the torch activation module."""
    kind = act_cfg.get("type") if isinstance(act_cfg, dict) else None
    if kind not in ACT_TYPES:
        raise ValueError(
            f"act_cfg={act_cfg!r} is not supported: type must be one of {tuple(ACT_TYPES)}"
        )
    factory = functools.partial(ACT_TYPES[kind], **{k: v for k, v in act_cfg.items()
                                                      if k != "type"})  # fmt: skip
    try:
        factory()
    except TypeError as err:
        raise ValueError(f"act_cfg={act_cfg!r} is invalid: {err}") from err
    return factory


@MODELS.register_module()
class FATRViT(FATRVisionTransformer, BaseModule):
    """Plain ViT backbone with Frequency-Aware Token Reduction, for mmseg 1.x.

    A drop-in for mmseg's ``VisionTransformer``: it takes the same arguments with the same
    defaults and meaning (the first block below), so an mmseg config runs with
    ``type='FATRViT'``. With ``reduction=None`` it computes what ``VisionTransformer`` computes,
    from the same weights (keys in timm's names; ``init_cfg`` converts mmseg checkpoints). It
    returns a tuple of full-grid (B, C, H/p, W/p) maps, one per ``out_indices``: reduced
    sequences are restored onto the grid, so any stock mmseg decode head or neck works unchanged.

    Args:
        img_size, patch_size, patch_pad, in_channels, embed_dims, num_layers, num_heads,
            mlp_ratio, out_origin, out_indices, qkv_bias, drop_rate, attn_drop_rate,
            drop_path_rate, with_cls_token, output_cls_token, patch_norm, patch_bias, pre_norm,
            final_norm, interpolate_mode, with_cp: As mmseg's ``VisionTransformer`` (see
            :class:`fatr_seg.layers.FATRVisionTransformer`). ``qkv_bias=False`` drops the
            attention's output-projection bias too, as mmseg's ``nn.MultiheadAttention`` does.
        norm_cfg: ``dict(type='LN', eps=1e-5, requires_grad=True)``: every norm is a LayerNorm.
        act_cfg: The MLP activation, ``dict(type=...)`` with a type of :data:`ACT_TYPES`.
        num_fcs: Linear layers per MLP; only 2 (a ViT's MLP).
        norm_eval: Keep the norms in eval mode while training (LayerNorms have no running
            statistics, so as in mmseg this changes nothing numerically).
        frozen_exclude: Parameters whose name contains none of these strings are frozen
            (``requires_grad=False``); ``['all']`` freezes nothing. Names match in fatr_seg's
            (timm) spelling and in mmseg's (``layers.0.ln1`` ...).
        pretrained: A checkpoint path or URL; the deprecated form of
            ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` loads a fatr_seg, timm or
            mmseg ``VisionTransformer`` checkpoint (format detected, positional embedding
            resized with ``interpolate_mode``); ``'Pretrained_Part'`` takes the keys under
            ``image_encoder.``, as mmseg.
        reduction: Reduction config dict, e.g. ``dict(method='fatr')`` (see
            :class:`fatr_seg.layers.ReductionConfig`); None gives the plain ViT.
        compact_output, check_finite, fused_attn, init_values: See
            :class:`fatr_seg.layers.FATRVisionTransformer`.

    Raises:
        ValueError: An argument FATRViT cannot honour, naming it and what is allowed.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        patch_pad: str | int = "corner",
        in_channels: int = 3,
        embed_dims: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4,
        out_origin: bool = False,
        out_indices: int | tuple[int, ...] = -1,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        with_cls_token: bool = True,
        output_cls_token: bool = False,
        norm_cfg: dict | None = None,
        act_cfg: dict | None = None,
        patch_norm: bool = False,
        patch_bias: bool = False,
        pre_norm: bool = False,
        final_norm: bool = False,
        interpolate_mode: str = "bicubic",
        num_fcs: int = 2,
        norm_eval: bool = False,
        with_cp: bool = False,
        frozen_exclude: list[str] | tuple[str, ...] = ("all",),
        pretrained: str | None = None,
        init_cfg: dict | list | None = None,
        reduction: dict | None = None,
        compact_output: bool = False,
        check_finite: bool = True,
        fused_attn: bool | None = None,
        init_values: float | None = None,
    ) -> None:
        eps, norm_grad = norm_from_cfg(dict(type="LN") if norm_cfg is None else norm_cfg)
        act_layer = act_from_cfg(dict(type="GELU") if act_cfg is None else act_cfg)
        if num_fcs != 2:
            raise ValueError(f"num_fcs={num_fcs} is not supported: a ViT MLP has 2 layers")
        if pretrained is not None:
            if not isinstance(pretrained, str):
                raise ValueError(f"pretrained={pretrained!r} is invalid: a path, URL or None")
            if init_cfg:
                raise ValueError("set pretrained or init_cfg, not both (pretrained is deprecated)")
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        if isinstance(frozen_exclude, str) or not all(isinstance(s, str) for s in frozen_exclude):
            raise ValueError(
                f"frozen_exclude={frozen_exclude!r} is invalid: a list of name substrings, "
                "['all'] to freeze nothing"
            )
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_channels=in_channels,
            embed_dims=embed_dims, num_layers=num_layers, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
            drop_path_rate=drop_path_rate, init_values=init_values, norm_eps=eps,
            final_norm=final_norm, out_indices=out_indices, reduction=reduction,
            fused_attn=fused_attn, check_finite=check_finite, compact_output=compact_output,
            attn_drop_rate=attn_drop_rate, proj_bias=qkv_bias, act_layer=act_layer,
            patch_bias=patch_bias, patch_norm=patch_norm, patch_pad=patch_pad,
            pre_norm=pre_norm, with_cls_token=with_cls_token,
            output_cls_token=output_cls_token, out_origin=out_origin,
            interpolate_mode=interpolate_mode, with_cp=with_cp,
        )  # fmt: skip
        self.init_cfg = init_cfg
        self.pretrained = pretrained
        self.norm_eval = norm_eval
        self.frozen_exclude = list(frozen_exclude)
        if not norm_grad:
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.requires_grad_(False)
        self._freeze()

    def _freeze(self) -> None:
        if "all" in self.frozen_exclude:
            return
        for name, param in self.named_parameters():
            names = (name, mmseg_name(name))
            if not any(ex in n for ex in self.frozen_exclude for n in names):
                param.requires_grad = False

    def train(self, mode: bool = True) -> FATRViT:
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.eval()
        return self

    def init_weights(self) -> None:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get("type") in ("Pretrained", "Pretrained_Part"):
            if "checkpoint" not in cfg:
                raise CheckpointError(f"init_cfg type {cfg['type']!r} needs a 'checkpoint'")
            self.load_pretrained(cfg["checkpoint"], part=cfg["type"] == "Pretrained_Part")
        elif cfg is not None:
            super().init_weights()

    def load_pretrained(self, path: str, part: bool = False) -> None:
        """Load a fatr_seg / timm / mmseg ViT checkpoint (path or URL) into the backbone.

        Every backbone weight must be present and every checkpoint key must be used; the
        exceptions: the reduction's own parameters (ω, DC positional terms) may be missing and
        keep their init, and weights of parts this backbone was built without (final norm,
        pre-norm, patch norm, patch bias) are left out with a warning, as mmseg's
        ``VisionTransformer`` leaves them out. ``part`` keeps only keys under ``image_encoder.``.
        """
        state = load_checkpoint_file(path)
        if part:
            state = {k[14:]: v for k, v in state.items() if k.startswith("image_encoder.")}
        if any(k.startswith("backbone.") for k in state):
            state = {k[9:]: v for k, v in state.items() if k.startswith("backbone.")}
        state = convert_state_dict(state)
        own = self.state_dict()
        self._drop_unused_parts(state, own, path)
        pos, own_len = state.get("pos_embed"), self.pos_embed.shape[1]
        # Only the grid may differ (another pretraining size); a wrong dim is reported below.
        if pos is not None and pos.shape[-1] == self.embed_dims and pos.shape[1] != own_len:
            print_log(f"resizing pos_embed {tuple(pos.shape)} -> {tuple(self.pos_embed.shape)}",
                      logger="current")  # fmt: skip
            state["pos_embed"] = resize_pos_embed(pos, self.pos_grid, self.interpolate_mode)
        hint = (" (check embed_dims/num_layers/mlp_ratio/patch_size/in_channels/qkv_bias/"
                "final_norm/pre_norm/patch_norm)")  # fmt: skip
        load_state_strict(self, state, path, "this backbone", optional=FATR_ONLY, hint=hint)
        print_log(f"loaded pretrained backbone from {path}", logger="current")

    @staticmethod
    def _drop_unused_parts(state: dict, own: dict, path: str) -> None:
        """Remove from ``state`` the weights of optional parts the backbone was built without."""
        unused = {}
        for key in [k for k in state if k not in own]:
            flag = next((f for p, f in _OPTIONAL_PARTS.items() if key.startswith(p)), None)
            if flag is None:
                continue
            value = state.pop(key)
            if flag == "patch_bias=False" and not bool(torch.count_nonzero(value)):
                continue  # a zero bias (added for mmseg checkpoints) is no bias
            unused.setdefault(flag, []).append(key)
        if unused:
            parts = "; ".join(f"{keys} ({flag})" for flag, keys in unused.items())
            print_log(
                f"{path}: not using {parts}: this backbone was built without them (mmseg's "
                "VisionTransformer ignores them too)",
                logger="current",
                level=logging.WARNING,
            )
