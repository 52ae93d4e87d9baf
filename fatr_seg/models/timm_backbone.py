"""``TimmFATRViT``: FATR on timm's VisionTransformer and Eva models, a registered mmseg backbone."""

from __future__ import annotations

from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmseg.registry import MODELS

from ..layers.timm_vit import TimmFATRVisionTransformer
from .convert import FATR_ONLY, CheckpointError, load_checkpoint_file, load_state_strict

__all__ = ["TimmFATRViT"]


@MODELS.register_module()
class TimmFATRViT(TimmFATRVisionTransformer, BaseModule):
    """A timm ViT or Eva, with Frequency-Aware Token Reduction, for mmseg 1.x.

    ``timm.create_model(model_name, **model_kwargs)`` gives the architecture (random weights);
    ``checkpoint`` gives the weights in timm's key layout. The reduction, outputs and budget
    are those of ``FATRViT``: the same ``reduction=`` dict, ``out_indices``, restored
    (B, C, H/p, W/p) maps for any mmseg head or ``compact_output=True`` for
    ``FATRSegmenterHead``, ``set_keep_ratio`` and ``tools/test.py --keep-ratio``. See
    :class:`fatr_seg.layers.TimmFATRVisionTransformer` and ``docs/timm.md``.

    Args:
        model_name: timm model name, e.g. ``'vit_small_patch14_reg4_dinov2'``.
        model_kwargs: More ``timm.create_model`` arguments (``img_size``, ``drop_path_rate``,
            ``class_token`` ...).
        checkpoint: A local ``.safetensors``/``.pth`` file, URL or model-zoo prefix in timm's
            key layout (a timm ``state_dict``, the Hugging Face hub's ``model.safetensors``, or
            a checkpoint timm's own filter converts, such as DINOv2's or EVA's originals),
            loaded in :meth:`init_weights` through mmengine's ``CheckpointLoader``. Its
            positional embedding is resampled to ``img_size``'s grid by timm's filter.
        pretrained: The same as ``checkpoint`` (mmseg's segmentor-level ``pretrained=``
            arrives here).
        init_cfg: ``dict(type='Pretrained', checkpoint=...)``, the same as ``checkpoint`` (the
            configs use it: ``tools/train.py`` checks that its file exists before training).
        drop_path_rate: ``model_kwargs['drop_path_rate']`` (stochastic depth), as ``FATRViT``
            takes it, so the fine-tuning recipe (``configs/_base_/distill_recipe.py``) sets it.
        **kwargs: The other arguments of :class:`fatr_seg.layers.TimmFATRVisionTransformer`
            (``out_indices``, ``reduction``, ``compact_output``, ``final_norm``,
            ``output_cls_token``, ``out_origin``, ``check_finite``, ``fused_attn``, ``with_cp``,
            ``antialias``).
    """

    def __init__(
        self,
        model_name: str,
        model_kwargs: dict | None = None,
        checkpoint: str | None = None,
        drop_path_rate: float | None = None,
        pretrained: str | None = None,
        init_cfg: dict | None = None,
        **kwargs,
    ) -> None:
        sources = [s for s in (checkpoint, pretrained) if s is not None]
        if isinstance(init_cfg, dict) and init_cfg.get("type") == "Pretrained":
            if "checkpoint" not in init_cfg:
                raise CheckpointError("init_cfg type 'Pretrained' needs a 'checkpoint'")
            sources.append(init_cfg["checkpoint"])
            init_cfg = None
        elif init_cfg is not None:
            raise ValueError(
                f"init_cfg={init_cfg!r} is not supported: TimmFATRViT keeps timm's own init; "
                "give the weights as checkpoint=PATH"
            )
        if len(set(sources)) > 1:
            raise ValueError(f"two checkpoints given ({sources}): set only checkpoint=")
        if sources and not isinstance(sources[0], str):
            raise ValueError(f"checkpoint={sources[0]!r} is invalid: a path, URL or None")
        model_kwargs = dict(model_kwargs or {})
        if drop_path_rate is not None:
            given = model_kwargs.setdefault("drop_path_rate", drop_path_rate)
            if given != drop_path_rate:
                raise ValueError(f"drop_path_rate={drop_path_rate} and model_kwargs "
                                 f"drop_path_rate={given}: give it once")  # fmt: skip
        super().__init__(model_name, model_kwargs, **kwargs)
        self.checkpoint = sources[0] if sources else None
        self.init_cfg = init_cfg

    def init_weights(self) -> None:
        """Load ``checkpoint`` if given; otherwise keep timm's random init."""
        if self.checkpoint is not None:
            self.load_pretrained(self.checkpoint)

    def load_pretrained(self, path: str) -> None:
        """Load a checkpoint in timm's key layout (path or URL), strictly.

        timm's own filter for the model's family converts original-format keys and resamples
        the positional embedding (and a patch embedding of another patch size); a Segmenter
        checkpoint's ``backbone.*`` keys are taken. Every backbone weight must be in it and
        every key used, except the reduction's own parameters (``attn.omega1``/``omega2``,
        ``reducer.dc_pos``), which keep their identity init, and the classifier's.

        Raises:
            CheckpointError: A missing or unreadable file, or a checkpoint of another model:
                the message names the first mismatched, missing or unexpected keys.
        """
        state = load_checkpoint_file(path)
        if any(k.startswith("backbone.") for k in state):
            state = {k[9:]: v for k, v in state.items() if k.startswith("backbone.")}
        try:
            state = self.timm_checkpoint_filter(state)
        except (RuntimeError, ValueError, KeyError, AttributeError) as err:
            raise CheckpointError(
                f"{path} does not match timm model {self.model_name!r}: timm's checkpoint "
                f"filter failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); first "
                f"keys: {list(state)[:5]}"
            ) from err
        hint = f" (is it a checkpoint of {self.model_name!r} with these model_kwargs?)"
        load_state_strict(self, state, path, f"timm model {self.model_name!r}",
                          optional=FATR_ONLY, hint=hint)  # fmt: skip
        print_log(f"loaded {self.model_name} weights from {path}", logger="current")
