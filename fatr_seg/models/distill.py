"""``DistillEncoderDecoder``: fine-tune a FATR segmentor by distillation from its unreduced self.

The paper's recipe (start from the trained model, cross-entropy plus self-distillation from the
unreduced model, EMA) for mmseg: the *student* is the usual FATR segmentor (this segmentor's
own modules); the *teacher* is the same architecture without reduction, loaded from a trained
segmentor checkpoint (ours, or mmseg's model-zoo format: its backbone keys are converted) and
frozen. The student starts from the same checkpoint; only the reduction's own parameters
(``attn.omega1``, ``attn.omega2``, ``reducer.dc_pos``) keep their identity init, so before the
first step the student is the teacher with tokens removed.

The teacher is deliberately *not* a registered submodule: its parameters are not in
``state_dict()`` (a distilled checkpoint is a plain FATR checkpoint), not in ``parameters()``
(the optimizer, DDP and mmengine's ``EMAHook`` never see it), and ``copy.deepcopy`` (which
``EMAHook`` uses for its averaged copy) shares it instead of copying it. ``.to()``/``.cuda()``/
``.half()`` still move it (:meth:`DistillEncoderDecoder._apply`), and it stays in eval mode.
See docs/method.md, "Fine-tuning: self-distillation".
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.logging import MessageHub, print_log
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS
from mmseg.utils import add_prefix

from ..layers.compact import CompactTokens
from ..layers.vit import FATRVisionTransformer
from .convert import (
    FATR_ONLY,
    CheckpointError,
    convert_state_dict,
    load_checkpoint_file,
    load_state_strict,
)
from .distill_loss import FEATURE_LOSSES, feature_distill_loss, kl_distill_loss, valid_weights
from .preflight import DISTILL_HELP

__all__ = ["DistillEncoderDecoder", "draw_keep_ratio", "teacher_config"]


class _Frozen:
    """Holds the teacher outside the module tree; ``deepcopy`` shares it (it never changes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __deepcopy__(self, memo: dict) -> _Frozen:
        return self


def teacher_config(backbone: dict, decode_head: dict, neck=None, auxiliary_head=None,
                   test_cfg=None) -> dict:  # fmt: skip
    """The student's segmentor without reduction: the default teacher.

    The backbone keeps every setting but ``reduction`` (None), ``compact_output`` (False: the
    head reads the full grid, which every head can) and ``init_cfg`` (None: the teacher's weights
    come from ``teacher_checkpoint``). Neck and heads are the student's, so a checkpoint of the
    unreduced model loads strictly.
    """
    backbone = copy.deepcopy(backbone)
    backbone.update(reduction=None, compact_output=False, init_cfg=None)
    return dict(type="EncoderDecoder", backbone=backbone, decode_head=copy.deepcopy(decode_head),
                neck=copy.deepcopy(neck), auxiliary_head=copy.deepcopy(auxiliary_head),
                test_cfg=copy.deepcopy(test_cfg))  # fmt: skip


def draw_keep_ratio(budget_range: tuple[float, float], seed: int, iteration: int) -> float:
    """The keep ratio of one training iteration, uniform in ``budget_range``.

    A function of ``(seed, iteration)`` alone, drawn from its own ``torch.Generator``: the global
    RNG is neither read nor advanced, and every DDP rank draws the same ratio without
    communicating. ``SeedSequence`` mixes the two integers, so neighbouring iterations get
    unrelated streams.
    """
    mixed = np.random.SeedSequence([seed, iteration]).generate_state(1, np.uint64)[0]
    gen = torch.Generator().manual_seed(int(mixed))
    u = torch.rand((), generator=gen, dtype=torch.float64).item()
    low, high = budget_range
    return low + (high - low) * u


def _mean_terms(per_budget: list[dict]) -> dict:
    """Each loss term averaged over budgets; a list-valued term (mmseg accepts a list of losses
    under one key) element by element."""
    n = len(per_budget)
    out = {}
    for key, first in per_budget[0].items():
        values = [terms[key] for terms in per_budget]
        if isinstance(first, (list, tuple)):
            out[key] = [sum(parts) / n for parts in zip(*values, strict=True)]
        else:
            out[key] = sum(values) / n
    return out


def _restored(feats) -> list[torch.Tensor]:
    return [f.restore() if isinstance(f, CompactTokens) else f for f in feats]


@MODELS.register_module()
class DistillEncoderDecoder(EncoderDecoder):
    """FATR segmentor fine-tuned with CE + self-distillation from a frozen unreduced teacher.

    Training loss: the decode head's own loss (``decode.loss_ce``, and any auxiliary head's)
    plus ``loss_distill = distill_weight · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))`` per
    position of the decode head's output grid (teacher logits ``z_t``, student ``z_s``),
    averaged over labelled positions (:mod:`fatr_seg.models.distill_loss`), and, with
    ``feat_distill_weight > 0``, ``loss_distill_feat`` between the student's and teacher's
    backbone outputs at ``out_indices`` on the restored full grid. Inference is the student
    alone, at the configured budget.

    Args:
        backbone, decode_head, neck, auxiliary_head, train_cfg, test_cfg, data_preprocessor,
            init_cfg: The student, as for mmseg's ``EncoderDecoder``.
        teacher_checkpoint: A trained unreduced segmentor checkpoint (fatr_seg's, or mmseg's
            ``VisionTransformer`` format). Loaded by :meth:`init_weights`, i.e. when training
            starts; testing a distilled checkpoint does not need it.
        teacher: The teacher's model config; None: :func:`teacher_config` (the student
            without reduction).
        init_student_from_teacher: Start the student from ``teacher_checkpoint``: every key
            must match, only the reduction's own parameters may be missing (they keep their
            identity init).
        distill_weight: Weight of ``loss_distill``.
        distill_temperature: T.
        feat_distill_weight: Weight of ``loss_distill_feat`` (0: not computed).
        feat_distill_type: ``'mse'`` or ``'cosine'``.
        budget_range: ``(low, high)`` in (0, 1]: each training iteration draws one keep ratio
            uniformly in it for the whole batch and every reduction layer
            (:func:`draw_keep_ratio`); the configured ratio is restored after the forward, so
            validation and inference use it. None: always the configured ratio.
        budget_anchors: Keep ratios in (0, 1] trained at *every* iteration beside the drawn one
            (needs ``budget_range``): ``(high,)`` is the sandwich rule of slimmable networks
            (the top budget every step). Each budget runs its own student forward; the teacher
            runs once; the loss terms are the means over the budgets, so their scale does not
            change. ``()``: the drawn ratio alone.
        budget_seed: Seed of the budget draws. The iteration is the Runner's (from mmengine's
            ``MessageHub``, so a resumed run draws the same sequence); outside a Runner, a
            count of :meth:`loss` calls.
    """

    def __init__(
        self,
        backbone: dict,
        decode_head: dict,
        teacher_checkpoint: str,
        teacher: dict | None = None,
        init_student_from_teacher: bool = True,
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
        feat_distill_weight: float = 0.0,
        feat_distill_type: str = "mse",
        budget_range: tuple[float, float] | None = None,
        budget_seed: int = 0,
        budget_anchors: tuple[float, ...] = (),
        neck: dict | None = None,
        auxiliary_head: dict | list | None = None,
        train_cfg: dict | None = None,
        test_cfg: dict | None = None,
        data_preprocessor: dict | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(backbone=backbone, decode_head=decode_head, neck=neck,
                         auxiliary_head=auxiliary_head, train_cfg=train_cfg, test_cfg=test_cfg,
                         data_preprocessor=data_preprocessor, init_cfg=init_cfg)  # fmt: skip
        if not isinstance(teacher_checkpoint, str) or not teacher_checkpoint:
            raise ValueError(
                f"teacher_checkpoint={teacher_checkpoint!r}: DistillEncoderDecoder needs the path "
                f"of a trained unreduced segmentor ({DISTILL_HELP})"
            )
        for key, value in (("distill_weight", distill_weight),
                           ("feat_distill_weight", feat_distill_weight)):  # fmt: skip
            if value < 0:
                raise ValueError(f"{key}={value} is invalid: a loss weight must be >= 0")
        if not distill_temperature > 0:
            raise ValueError(f"distill_temperature={distill_temperature} is invalid: must be > 0")
        if feat_distill_type not in FEATURE_LOSSES:
            raise ValueError(
                f"feat_distill_type={feat_distill_type!r} is invalid: use one of {FEATURE_LOSSES}"
            )
        if not isinstance(budget_seed, int) or budget_seed < 0:
            raise ValueError(f"budget_seed={budget_seed!r} is invalid: use an integer >= 0")
        self.teacher_checkpoint = teacher_checkpoint
        self.init_student_from_teacher = init_student_from_teacher
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.feat_distill_weight = feat_distill_weight
        self.feat_distill_type = feat_distill_type
        self.budget_range = self._check_budget_range(budget_range)
        self.budget_seed = budget_seed
        self.budget_anchors = self._check_budget_anchors(budget_anchors)
        self._budget_calls = 0

        if teacher is None:
            teacher = teacher_config(backbone, decode_head, neck, auxiliary_head, test_cfg)
        model = MODELS.build(teacher)
        model.requires_grad_(False)
        model.eval()
        self._frozen = _Frozen(model)

    def _check_budget_range(self, budget_range) -> tuple[float, float] | None:
        if budget_range is None:
            return None
        try:
            low, high = (float(v) for v in budget_range)
        except (TypeError, ValueError):
            low = high = float("nan")
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"budget_range={budget_range!r} is invalid: give (low, high) with "
                "0 < low <= high <= 1"
            )
        reduction = getattr(self.backbone, "reduction", None)
        if reduction is None or reduction.keep_ratio is None:
            raise ValueError(
                f"budget_range={budget_range!r} needs a backbone whose reduction is set by "
                "keep_ratio (FATRViT with reduction=dict(keep_ratio=...)); this one has "
                f"{'no reduction' if reduction is None else 'a token count r'}"
            )
        return low, high

    def _check_budget_anchors(self, anchors) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in anchors)
        except (TypeError, ValueError):
            values = (float("nan"),)
        if not all(0 < v <= 1 for v in values):
            raise ValueError(
                f"budget_anchors={anchors!r} is invalid: give a tuple of keep ratios in (0, 1], "
                "e.g. (0.9,), or ()"
            )
        if values and self.budget_range is None:
            raise ValueError(
                f"budget_anchors={anchors!r} needs budget_range: the anchors are trained beside "
                "a drawn ratio"
            )
        return values

    @property
    def teacher(self) -> torch.nn.Module:
        """The frozen teacher segmentor (not a submodule: see the module docstring)."""
        return self._frozen.model

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if recurse and "_frozen" in self.__dict__:
            self.teacher._apply(fn)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if "_frozen" in self.__dict__:
            self.teacher.eval()  # the teacher never trains (no dropout, no drop-path)
        return self

    # --------------------------------------------------------------------------------------
    # Weights

    def init_weights(self) -> None:
        """Initialise the student's modules, then load the teacher (and the student) weights."""
        super().init_weights()
        self.load_teacher()

    def load_teacher(self) -> None:
        """Load ``teacher_checkpoint`` into the teacher, and into the student if asked, strictly.

        Raises:
            CheckpointError: A missing file, or keys or shapes that do not match, named.
        """
        path = self.teacher_checkpoint
        if not os.path.isfile(path):
            raise CheckpointError(f"teacher checkpoint not found: {path} ({DISTILL_HELP})")
        state = load_checkpoint_file(path)
        if not any(k.startswith("backbone.") for k in state):
            raise CheckpointError(
                f"{path} is not a segmentor checkpoint (no 'backbone.*' keys; first keys: "
                f"{list(state)[:4]}): model.teacher_checkpoint needs a trained segmentor "
                f"({DISTILL_HELP})"
            )
        converted = convert_state_dict(state)  # backbone keys to ours; heads pass through
        hint = " (the teacher is model.teacher, or the student's config without reduction)"
        ours = isinstance(self.teacher.backbone, FATRVisionTransformer)
        load_state_strict(self.teacher, converted if ours else state, path, "the teacher",
                          hint=hint)  # fmt: skip
        print_log(f"loaded the distillation teacher from {path}", logger="current")
        if self.init_student_from_teacher:
            hint = " (the student must be the teacher plus a reduction)"
            load_state_strict(self, converted, path, "the student", optional=FATR_ONLY, hint=hint)
            print_log(f"initialised the student from {path}", logger="current")

    # --------------------------------------------------------------------------------------
    # Training

    def next_keep_ratio(self) -> float:
        """Draw this training iteration's keep ratio (see ``budget_range``)."""
        iteration = MessageHub.get_current_instance().get_info("iter")
        if iteration is None:
            iteration = self._budget_calls
        self._budget_calls += 1
        return draw_keep_ratio(self.budget_range, self.budget_seed, int(iteration))

    def _student_forward(self, inputs: torch.Tensor, ratio: float | None = None):
        """Backbone outputs, decode-head inputs and logits of the student, at keep ratio
        ``ratio`` (None: the configured one, which is restored afterwards in any case)."""
        if ratio is None:
            feats = self.backbone(inputs)
        else:
            configured = self.backbone.reduction.keep_ratio
            self.backbone.set_keep_ratio(ratio)
            try:
                feats = self.backbone(inputs)
            finally:
                self.backbone.set_keep_ratio(configured)
        x = self.neck(feats) if self.with_neck else feats
        return feats, x, self.decode_head.forward(x)

    @torch.no_grad()
    def _teacher_forward(self, inputs: torch.Tensor) -> tuple[list, torch.Tensor]:
        t_feats = self.teacher.backbone(inputs)
        t_x = self.teacher.neck(t_feats) if self.teacher.with_neck else t_feats
        return t_feats, self.teacher.decode_head.forward(t_x)

    def loss(self, inputs: torch.Tensor, data_samples) -> dict:
        """CE (and auxiliary) losses of the student, plus the distillation terms.

        With ``budget_range``: at the drawn keep ratio and every ``budget_anchors`` ratio, each
        term averaged over those budgets; ``keep_ratio`` (logged, not optimised) is the drawn one.
        """
        ratios = [None] if self.budget_range is None else [self.next_keep_ratio(),
                                                           *self.budget_anchors]  # fmt: skip
        distill = self.distill_weight > 0 or self.feat_distill_weight > 0
        teacher = self._teacher_forward(inputs) if distill else None
        gt = self.decode_head._stack_batch_gt(data_samples) if distill else None
        per_budget = [self._budget_losses(inputs, data_samples, r, teacher, gt) for r in ratios]
        losses = per_budget[0] if len(per_budget) == 1 else _mean_terms(per_budget)
        if ratios[0] is not None:
            losses["keep_ratio"] = inputs.new_tensor(ratios[0])
        return losses

    def _budget_losses(self, inputs, data_samples, ratio, teacher, gt) -> dict:
        """The loss terms of one student forward at keep ratio ``ratio``."""
        feats, x, logits = self._student_forward(inputs, ratio)
        losses = add_prefix(self.decode_head.loss_by_feat(logits, data_samples), "decode")
        if self.with_auxiliary_head:
            losses.update(self._auxiliary_head_forward_train(x, data_samples))
        if teacher is None:
            return losses
        t_feats, t_logits = teacher
        ignore = self.decode_head.ignore_index
        if self.distill_weight > 0:
            losses["loss_distill"] = self.distill_weight * self._logit_loss(
                logits, t_logits, gt, ignore
            )
        if self.feat_distill_weight > 0:
            losses["loss_distill_feat"] = self.feat_distill_weight * self._feature_loss(
                feats, t_feats, gt, ignore
            )
        return losses

    def _logit_loss(self, logits, t_logits, gt, ignore) -> torch.Tensor:
        if t_logits.shape[1] != logits.shape[1]:
            raise ValueError(
                f"the teacher predicts {t_logits.shape[1]} classes, the student "
                f"{logits.shape[1]}: distillation needs the same classes"
            )
        if t_logits.shape[2:] != logits.shape[2:]:  # another head: compare on the student's grid
            t_logits = F.interpolate(t_logits, size=logits.shape[2:], mode="bilinear",
                                     align_corners=self.align_corners)  # fmt: skip
        weights = valid_weights(gt, logits.shape[2:], ignore)
        return kl_distill_loss(logits, t_logits, weights, self.distill_temperature)

    def _feature_loss(self, feats, t_feats, gt, ignore) -> torch.Tensor:
        feats, t_feats = _restored(feats), _restored(t_feats)
        shapes = [tuple(f.shape) for f in feats], [tuple(f.shape) for f in t_feats]
        if shapes[0] != shapes[1]:
            raise ValueError(
                f"feat_distill_weight > 0 compares backbone outputs, but the student's are "
                f"{shapes[0]} and the teacher's {shapes[1]}: give both the same out_indices "
                "and embed_dims"
            )
        terms = []
        for s, t in zip(feats, t_feats, strict=True):
            weights = valid_weights(gt, s.shape[2:], ignore)
            terms.append(feature_distill_loss(s, t, weights, self.feat_distill_type))
        return torch.stack(terms).mean()
