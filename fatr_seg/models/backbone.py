"""``FATRViT``: the registered mmseg backbone."""

from __future__ import annotations

from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmseg.registry import MODELS

from ..layers.vit import FATRVisionTransformer
from .convert import (
    FATR_ONLY,
    CheckpointError,
    convert_state_dict,
    load_checkpoint_file,
    load_state_strict,
    resize_pos_embed,
)

__all__ = ["FATRViT"]


@MODELS.register_module()
class FATRViT(FATRVisionTransformer, BaseModule):
    """Plain ViT backbone with Frequency-Aware Token Reduction, for mmseg 1.x.

    Returns a tuple of full-grid (B, C, H/p, W/p) maps, one per ``out_indices``, like mmseg's
    ``VisionTransformer``: reduced sequences are restored onto the grid by ``TokenRestorer``
    (HF tokens at their positions, DC tokens at the positions they stand for), so any stock mmseg
    decode head or neck works unchanged.

    Args:
        reduction: Reduction config dict, e.g. ``dict(method='fatr', layers=(4, 7, 10),
            keep_ratio=0.7, windows=(2, 2, 1), score='exact', reweight='identity',
            restore='dc')``; missing keys take these defaults. None gives a plain ViT.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads a fatr_seg, timm or mmseg
            ``VisionTransformer`` checkpoint (format detected, positional embedding resized).
        **kwargs: See :class:`fatr_seg.layers.FATRVisionTransformer`.
    """

    def __init__(self, *args, init_cfg: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.init_cfg = init_cfg

    def init_weights(self) -> None:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get("type") == "Pretrained":
            if "checkpoint" not in cfg:
                raise CheckpointError("init_cfg type 'Pretrained' needs a 'checkpoint' path")
            self.load_pretrained(cfg["checkpoint"])
        elif cfg is not None:
            super().init_weights()

    def load_pretrained(self, path: str) -> None:
        """Load a fatr_seg / timm / mmseg ViT checkpoint into the backbone, strictly.

        Every backbone weight must be present and every checkpoint key must be used; only the
        reduction's own parameters (ω, DC positional terms) may be missing, and keep their init.
        """
        state = load_checkpoint_file(path)
        if any(k.startswith("backbone.") for k in state):
            state = {k[9:]: v for k, v in state.items() if k.startswith("backbone.")}
        state = convert_state_dict(state)
        pos, own_len = state.get("pos_embed"), self.pos_embed.shape[1]
        # Only the grid may differ (another pretraining size); a wrong dim is reported below.
        if pos is not None and pos.shape[-1] == self.embed_dims and pos.shape[1] != own_len:
            print_log(f"resizing pos_embed {tuple(pos.shape)} -> {tuple(self.pos_embed.shape)}",
                      logger="current")  # fmt: skip
            state["pos_embed"] = resize_pos_embed(pos, self.pos_grid)
        hint = " (check embed_dims/num_layers/mlp_ratio/patch_size/in_channels)"
        load_state_strict(self, state, path, "this backbone", optional=FATR_ONLY, hint=hint)
        print_log(f"loaded pretrained backbone from {path}", logger="current")
