"""``DistillEncoderDecoder``: teacher loading and freezing, student init, losses, DDP, budgets.

Every test builds a tiny FATR Segmenter (4 blocks of width 32, 8-pixel patches, 64x64 images)
and a teacher checkpoint it writes itself: either fatr_seg's format (an unreduced segmentor) or
mmseg's model-zoo format (mmseg's own ``VisionTransformer`` + ``SegmenterMaskTransformerHead``).
"""

import copy
import uuid

import pytest
import torch
import torch.distributed as dist
from mmengine.logging import MessageHub
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
from tiny_segmentors import (
    CLASSES,
    DEPTH,
    EMBED,
    HEADS,
    IMG,
    PATCH,
    batch,
    distill_cfg,
    plain_segmentor,
    randomize_,
    save_teacher,
    segmentor_cfg,
)
from torch.nn.parallel import DistributedDataParallel
from torch.testing import assert_close

from fatr_seg.models import CheckpointError, DistillEncoderDecoder
from fatr_seg.models.distill import draw_keep_ratio
from fatr_seg.models.distill_loss import kl_distill_loss, valid_weights

register_all_modules()
pytestmark = pytest.mark.usefixtures("single_thread")
FATR_ONLY = ("omega1", "omega2", "dc_pos")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    return path, save_teacher(path, seed=0)


def build(teacher_ckpt, init=True, **kwargs):
    model = MODELS.build(distill_cfg(teacher_ckpt[0], **kwargs))
    if init:
        model.init_weights()
    return model


def losses_total(losses):
    return sum(v for k, v in losses.items() if "loss" in k)


# ---------------------------------------------------------------------------------------------
# Teacher and student weights


def test_teacher_is_frozen_and_loaded(teacher_ckpt):
    _, state = teacher_ckpt
    model = build(teacher_ckpt)
    teacher = model.teacher
    assert teacher.backbone.reduction is None
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(not p.requires_grad for p in teacher.parameters())
    model.train()
    assert model.training and not teacher.training
    assert not any(m.training for m in teacher.modules())


def test_student_starts_from_the_teacher_with_identity_fatr_parameters(teacher_ckpt):
    _, state = teacher_ckpt
    model = build(teacher_ckpt, reduction=dict(method="fatr_paper", layers=(2, 3),
                                               keep_ratio=0.5, windows=(2, 1)))  # fmt: skip
    own = model.state_dict()
    extra = sorted(set(own) - set(state))
    assert extra and all(k.endswith(FATR_ONLY) for k in extra), extra
    assert {k.rsplit(".", 1)[1] for k in extra} == set(FATR_ONLY)
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    for key in extra:  # identity init: omega2 is stored as 1 + w2, so 0 is plain attention
        assert torch.equal(own[key], torch.zeros_like(own[key])), key
    # Not asked to: the student keeps its random init.
    fresh = build(teacher_ckpt, init_student_from_teacher=False)
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(fresh.state_dict()[key], state[key])
    assert torch.equal(fresh.teacher.state_dict()[key], state[key])


def test_teacher_is_not_in_state_dict_parameters_or_deepcopies(teacher_ckpt):
    model = build(teacher_ckpt)
    plain = plain_segmentor()
    assert set(model.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    teacher_ids = {id(p) for p in model.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    # mmengine's EMAHook deep-copies the model: the frozen teacher is shared, not copied.
    ema = copy.deepcopy(model)
    assert ema.teacher is model.teacher
    assert ema.backbone.blocks[0].attn.qkv.weight is not model.backbone.blocks[0].attn.qkv.weight


def test_to_moves_the_teacher_too(teacher_ckpt):
    model = build(teacher_ckpt, init=False).double()
    assert all(p.dtype == torch.float64 for p in model.teacher.parameters())
    model.float()
    assert all(p.dtype == torch.float32 for p in model.teacher.parameters())


def test_missing_teacher_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "work_dirs" / "iter_1000.pth"
    model = MODELS.build(distill_cfg(path))
    with pytest.raises(CheckpointError, match="teacher checkpoint not found") as err:
        model.init_weights()
    assert str(path) in str(err.value) and "Fine-tune a trained Segmenter" in str(err.value)


def test_mismatched_teacher_checkpoint_names_the_keys(tmp_path):
    path = tmp_path / "deeper.pth"
    deeper = plain_segmentor(reduction=None, num_layers=DEPTH + 1)
    torch.save({"state_dict": deeper.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"the teacher: missing \[\], unexpected "
                                              r"\['backbone\.blocks\.4\."):  # fmt: skip
        build((path, None))
    backbone_only = tmp_path / "backbone_only.pth"
    torch.save({k[9:]: v for k, v in deeper.state_dict().items() if k.startswith("backbone.")},
               backbone_only)  # fmt: skip
    with pytest.raises(CheckpointError, match="not a segmentor checkpoint"):
        build((backbone_only, None))


def test_student_must_be_the_teacher_plus_a_reduction(teacher_ckpt):
    """Strict about every key but the FATR-only ones: another head does not load silently."""
    teacher = dict(type="EncoderDecoder", **segmentor_cfg(reduction=None, compact_output=False))
    model = MODELS.build(distill_cfg(teacher_ckpt[0], teacher=teacher))
    model.init_weights()  # an explicit teacher config works like the derived one
    other_head = distill_cfg(teacher_ckpt[0])
    other_head["decode_head"]["num_layers"] = 2
    other_head["teacher"] = teacher
    with pytest.raises(CheckpointError, match=r"the student: missing \['decode_head\.layers\.1"):
        MODELS.build(other_head).init_weights()


def mmseg_segmenter(seed):
    """mmseg's own Segmenter (its ViT and mask head): the model zoo's checkpoint format."""
    cfg = dict(
        type="EncoderDecoder",
        backbone=dict(
            type="VisionTransformer",
            img_size=(IMG, IMG),
            patch_size=PATCH,
            embed_dims=EMBED,
            num_layers=DEPTH,
            num_heads=HEADS,
            final_norm=True,
            with_cls_token=True,
            interpolate_mode="bicubic",
            norm_cfg=dict(type="LN", eps=1e-6),
        ),  # fmt: skip
        decode_head=dict(
            type="SegmenterMaskTransformerHead",
            in_channels=EMBED,
            channels=EMBED,
            num_classes=CLASSES,
            num_layers=1,
            num_heads=HEADS,
            embed_dims=EMBED,
            dropout_ratio=0.0,
        ),  # fmt: skip
    )
    return randomize_(MODELS.build(cfg), seed).eval()


@torch.no_grad()
def test_mmseg_zoo_checkpoint_gives_mmseg_logits(tmp_path):
    ref = mmseg_segmenter(seed=3)
    path = tmp_path / "segmenter_vit-t_mask_zoo.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": ref.state_dict()}, path)
    model = build((path, None)).double().eval()
    ref.double()
    images, _ = batch(seed=5)
    images = images.double()
    assert_close(model.teacher._forward(images), ref._forward(images), rtol=1e-9, atol=1e-9)
    # The student is the teacher plus a reduction: with a budget that keeps every token it
    # computes the same logits.
    model.backbone.set_keep_ratio(1.0)
    assert_close(model._forward(images), ref._forward(images), rtol=1e-9, atol=1e-9)


def test_distill_from_an_mmseg_zoo_checkpoint(tmp_path):
    path = tmp_path / "segmenter_vit-t_mask_zoo.pth"
    torch.save({"meta": {}, "state_dict": mmseg_segmenter(seed=4).state_dict()}, path)
    model = build((path, None))
    model.train()
    images, samples = batch(seed=6)
    losses = model.loss(images, samples)
    assert losses["loss_distill"] > 0
    losses_total(losses).backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Losses and gradients


def test_loss_keys_and_distill_term(teacher_ckpt):
    model = build(teacher_ckpt, distill_weight=0.5, distill_temperature=2.0)
    model.train()
    images, samples = batch()
    losses = model.loss(images, samples)
    assert set(losses) == {"decode.loss_ce", "decode.acc_seg", "loss_distill"}
    with torch.no_grad():
        student = model._forward(images)
        teacher = model.teacher._forward(images)
    gt = torch.stack([s.gt_sem_seg.data for s in samples])
    weights = valid_weights(gt, student.shape[2:], 255)
    expected = 0.5 * kl_distill_loss(student, teacher, weights, 2.0)
    assert_close(losses["loss_distill"].detach(), expected, rtol=1e-5, atol=1e-7)
    assert losses["loss_distill"] > 0
    # No reduction at this budget: the student is the teacher, and the distillation term is 0.
    model.backbone.set_keep_ratio(1.0)
    assert model.loss(images, samples)["loss_distill"].abs() < 1e-6


def test_feature_term(teacher_ckpt):
    model = build(teacher_ckpt, feat_distill_weight=2.0, feat_distill_type="cosine",
                  backbone=dict(out_indices=(1, 3)))  # fmt: skip
    images, samples = batch()
    losses = model.loss(images, samples)
    assert {"loss_distill", "loss_distill_feat"} <= set(losses)
    assert 0 < losses["loss_distill_feat"] < 2.0 * 2
    model.backbone.set_keep_ratio(1.0)
    assert model.loss(images, samples)["loss_distill_feat"].abs() < 1e-5


@pytest.mark.parametrize(
    "reduction",
    [
        "default",
        dict(method="fatr_paper", layers=(2, 3), keep_ratio=0.5, windows=(2, 1)),
    ],
    ids=["fatr", "fatr_paper"],
)
def test_every_student_parameter_gets_a_gradient(teacher_ckpt, reduction):
    model = build(teacher_ckpt, reduction=reduction, feat_distill_weight=1.0,
                  budget_range=(0.4, 0.9))  # fmt: skip
    model.train()
    images, samples = batch()
    losses_total(model.loss(images, samples)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(p.grad is None for p in model.teacher.parameters())


def test_ddp_without_find_unused_parameters(teacher_ckpt, tmp_path):
    """mmseg's default DDP (``find_unused_parameters=False``) trains: DDP raises at the second
    step if a parameter it wraps got no gradient in the first; the teacher is not wrapped."""
    model = build(teacher_ckpt, budget_range=(0.5, 0.9))
    model.train()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        wrapped = {id(p) for p in ddp.parameters()}
        assert not wrapped & {id(p) for p in model.teacher.parameters()}
        optim = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
        for step in range(3):
            images, samples = batch(seed=step)
            optim.zero_grad()
            losses_total(ddp(images, samples, mode="loss")).backward()
            optim.step()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Sampled budgets


def fresh_hub(**info):
    hub = MessageHub.get_instance(f"distill-test-{uuid.uuid4().hex}")
    for key, value in info.items():
        hub.update_info(key, value)
    return hub


def test_draws_are_deterministic_uniform_and_leave_the_global_rng_alone():
    rng = torch.get_rng_state()
    first = [draw_keep_ratio((0.5, 0.9), 7, i) for i in range(400)]
    assert torch.equal(torch.get_rng_state(), rng)
    assert first == [draw_keep_ratio((0.5, 0.9), 7, i) for i in range(400)]
    assert first != [draw_keep_ratio((0.5, 0.9), 8, i) for i in range(400)]
    values = torch.tensor(first)
    assert 0.5 <= values.min() and values.max() <= 0.9
    # Uniform: each quarter of the range holds about a quarter of the draws.
    counts = torch.histc(values, bins=4, min=0.5, max=0.9)
    assert (counts > 60).all(), counts
    assert draw_keep_ratio((0.6, 0.6), 0, 3) == 0.6


def test_two_ranks_draw_the_same_ratio(teacher_ckpt):
    """Simulated ranks: separately built models with different global RNG states (as after
    different data augmentation) draw the same ratio at the same Runner iteration."""
    ratios = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        torch.rand(rank + 5)
        model = build(teacher_ckpt, init=False, budget_range=(0.3, 0.9), budget_seed=11)
        fresh_hub(iter=41)
        ratios.append(model.next_keep_ratio())
    assert ratios[0] == ratios[1] == draw_keep_ratio((0.3, 0.9), 11, 41)
    # Outside a Runner (no 'iter' in the hub): the count of draws.
    fresh_hub()
    model = build(teacher_ckpt, init=False, budget_range=(0.3, 0.9), budget_seed=11)
    assert [model.next_keep_ratio() for _ in range(3)] == [
        draw_keep_ratio((0.3, 0.9), 11, i) for i in range(3)
    ]


def record_reducer_budgets(model):
    seen = []
    reducers = [b.reducer for b in model.backbone.blocks if b.reducer is not None]
    hooks = [r.register_forward_pre_hook(lambda m, args: seen.append(m.cfg.keep_ratio[m.j]))
             for r in reducers]  # fmt: skip
    return seen, hooks, len(reducers)


def sampled_step(teacher_ckpt, iteration, **options):
    """One loss of a student drawing its budget in (0.3, 0.9) (seed 5) at ``iteration``, with the
    budgets its reducers ran at recorded; returns what the tests read."""
    model = build(teacher_ckpt, budget_range=(0.3, 0.9), budget_seed=5, **options)
    configured = model.backbone.reduction
    seen, hooks, n = record_reducer_budgets(model)
    images, samples = batch()
    fresh_hub(iter=iteration)
    losses = model.loss(images, samples)
    ratio = draw_keep_ratio((0.3, 0.9), 5, iteration)
    return model, configured, seen, hooks, n, (images, samples), losses, ratio


def test_sampled_ratio_reaches_the_reducers_and_predict_uses_the_configured_one(teacher_ckpt):
    model, configured, seen, hooks, n, (images, samples), losses, ratio = sampled_step(
        teacher_ckpt, 17
    )
    assert seen == [pytest.approx(ratio, abs=0)] * n
    assert_close(losses["keep_ratio"], torch.tensor(ratio))
    assert model.backbone.reduction == configured
    # The drawn budget is what the student computed with: a model fixed at that budget agrees.
    fixed = build(teacher_ckpt)
    fixed.backbone.set_keep_ratio(ratio)
    assert_close(fixed.loss(images, samples)["loss_distill"], losses["loss_distill"])

    seen.clear()
    model.eval()
    with torch.no_grad():
        model.predict(images, samples)
    assert seen == list(configured.keep_ratio)
    for h in hooks:
        h.remove()


def test_anchors_train_beside_the_drawn_ratio_and_average_the_terms(teacher_ckpt):
    """Sandwich rule: each iteration runs the student at the drawn ratio, then at every anchor;
    each loss term is the mean of what models fixed at those budgets compute, and so is the
    gradient."""
    model, configured, seen, hooks, n, (images, samples), losses, ratio = sampled_step(
        teacher_ckpt, 23, budget_anchors=(0.9, 1.0)
    )
    assert seen == [pytest.approx(ratio, abs=0)] * n + [0.9] * n + [1.0] * n
    assert_close(losses["keep_ratio"], torch.tensor(ratio))
    assert model.backbone.reduction == configured
    model.zero_grad()
    losses_total(losses).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    for h in hooks:
        h.remove()

    fixed = build(teacher_ckpt)
    terms, ref_grads = [], {}
    for r in (ratio, 0.9, 1.0):
        fixed.backbone.set_keep_ratio(r)
        fixed.zero_grad()
        out = fixed.loss(images, samples)
        (losses_total(out) / 3).backward()
        terms.append(out)
        for k, p in fixed.named_parameters():
            if p.grad is not None:
                ref_grads[k] = ref_grads.get(k, 0) + p.grad
    for key in ("decode.loss_ce", "loss_distill"):
        assert_close(losses[key], sum(t[key] for t in terms) / 3, rtol=1e-6, atol=1e-7)
    assert terms[0]["loss_distill"] != terms[1]["loss_distill"]  # the budgets differ
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(budget_range=(0.0, 0.5)), r"budget_range=\(0\.0, 0\.5\) is invalid"),
        (dict(budget_range=(0.9, 0.5)), r"budget_range=\(0\.9, 0\.5\) is invalid"),
        (dict(budget_range=0.5), r"budget_range=0\.5 is invalid"),
        (dict(budget_range=(0.5, 0.9), reduction=None), r"budget_range=.*no reduction"),
        (
            dict(
                budget_range=(0.5, 0.9),
                reduction=dict(method="tome", layers=(2, 3), r=4, keep_ratio=None),
            ),
            "a token count r",
        ),
        (dict(budget_seed=-1), r"budget_seed=-1 is invalid"),
        (
            dict(budget_range=(0.5, 0.9), budget_anchors=(1.2,)),
            r"budget_anchors=\(1\.2,\) is invalid: give a tuple of keep ratios in \(0, 1\]",
        ),
        (dict(budget_range=(0.5, 0.9), budget_anchors=0.9), r"budget_anchors=0\.9 is invalid"),
        (
            dict(budget_range=(0.5, 0.9), budget_anchors=("high",)),
            r"budget_anchors=\('high',\) is invalid",
        ),
        (dict(budget_anchors=(0.9,)), r"budget_anchors=\(0\.9,\) needs budget_range"),
        (dict(distill_temperature=0), r"distill_temperature=0 is invalid"),
        (dict(distill_weight=-1.0), r"distill_weight=-1\.0 is invalid"),
        (dict(feat_distill_type="l2"), r"feat_distill_type='l2' is invalid"),
    ],
)
def test_bad_options_fail_at_build_naming_the_key(teacher_ckpt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(teacher_ckpt, init=False, **kwargs)


def test_missing_teacher_checkpoint_option_fails_at_build():
    cfg = distill_cfg("x")
    cfg["teacher_checkpoint"] = None
    with pytest.raises(ValueError, match="teacher_checkpoint=None"):
        MODELS.build(cfg)
    assert issubclass(DistillEncoderDecoder, torch.nn.Module)


def test_terms_averaged_over_budgets_keep_list_valued_losses():
    """mmseg accepts a list of losses under one key: averaged element by element."""
    from fatr_seg.models.distill import _mean_terms

    a = {"loss_ce": torch.tensor(1.0), "loss_list": [torch.tensor(2.0), torch.tensor(4.0)]}
    b = {"loss_ce": torch.tensor(3.0), "loss_list": [torch.tensor(6.0), torch.tensor(0.0)]}
    out = _mean_terms([a, b])
    assert_close(out["loss_ce"], torch.tensor(2.0))
    assert len(out["loss_list"]) == 2
    assert_close(out["loss_list"][0], torch.tensor(4.0))
    assert_close(out["loss_list"][1], torch.tensor(2.0))
