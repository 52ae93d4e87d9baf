"""The fine-tuning recipe in the configs: distillation model, AdamW with zero-decay groups, EMA.

Also checks why ``omega2`` is stored as ``1 + w2``: weight decay pulls it towards 0, which is
plain attention, and no longer towards the paper's literal formula (DC columns counted twice).
"""

import copy
import math
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
from tiny_configs import load_config
from torch.testing import assert_close

from fatr_seg.layers.attention import Attention
from fatr_seg.models import DistillEncoderDecoder
from fatr_seg.models.preflight import PreflightError, check_config_paths

register_all_modules()
pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ZERO_DECAY = ("omega1", "omega2", "dc_pos", "pos_embed", "cls_token")
ADE = "fatr_vit-s_mask_distill-8xb1-16k_ade20k-512x512.py"
CAMVID = "camvid/fatr_vit-t_camvid_distill.py"
DEMO = "demo/fatr_vit-t_fcn_distill-1xb8-100_synthetic-192x192.py"
PAIRS = {ADE: "fatr_ade20k.py", CAMVID: "camvid/fatr_vit-t_camvid.py"}


def load(name):
    if not (CONFIGS / PAIRS.get(name, name)).is_file():
        pytest.skip(f"configs/{PAIRS[name]} (the model this config fine-tunes) is not here yet")
    return load_config(CONFIGS / name)


def shrink(cfg, paper=False):
    """The config's model at width 48 and 4 blocks (reduction at 2, 3); builds in milliseconds."""
    model = cfg.model
    model.backbone.update(embed_dims=48, num_heads=3, num_layers=4, init_cfg=None)
    reduction = dict(layers=(2, 3), keep_ratio=0.5)
    if paper:  # the paper's DC tokens: omega2 and dc_pos exist too
        reduction.update(method="fatr_paper", windows=(2, 1))
    model.backbone.reduction = reduction
    model.decode_head.update(in_channels=48, channels=48, embed_dims=48, num_heads=3)
    return cfg


@pytest.mark.parametrize("name", [ADE, CAMVID])
def test_config_is_the_papers_recipe(name):
    cfg = load(name)
    model = cfg.model
    assert model.type == "DistillEncoderDecoder"
    assert model.init_student_from_teacher is True
    assert model.teacher_checkpoint.endswith(".pth")
    assert model.backbone.init_cfg is None and model.backbone.drop_path_rate == 0.0
    assert model.feat_distill_weight == 0.0 and model.budget_range is None
    assert model.budget_anchors == ()
    optim = cfg.optim_wrapper
    assert optim.optimizer == dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=2e-5)
    assert cfg.optimizer == optim.optimizer  # the top-level variable says the same
    assert optim.paramwise_cfg.custom_keys == {k: dict(decay_mult=0.0) for k in ZERO_DECAY}
    (ema,) = [h for h in cfg.custom_hooks if h.type == "EMAHook"]
    assert ema.ema_type == "ExponentialMovingAverage"
    assert math.isclose(1 - ema.momentum, 0.9998)
    # No warm-up: one schedule, starting at the first iteration at the full learning rate.
    (sched,) = cfg.param_scheduler
    assert sched.type == "CosineAnnealingLR" and sched.begin == 0
    assert sched.end == cfg.train_cfg.max_iters
    # Everything but the recipe is the FATR config it fine-tunes: same model, same data.
    base = Config.fromfile(str(CONFIGS / PAIRS[name]))
    for key in ("train_dataloader", "val_dataloader", "test_dataloader", "val_evaluator"):
        assert cfg[key] == base[key], key
    extra = {"type", "teacher_checkpoint", "init_student_from_teacher", "distill_weight",
             "distill_temperature", "feat_distill_weight", "budget_range",
             "budget_seed", "budget_anchors"}  # fmt: skip
    student = {k: v for k, v in model.items() if k not in extra}
    student["backbone"] = {**student["backbone"], "init_cfg": base.model.backbone.init_cfg,
                           "drop_path_rate": base.model.backbone.drop_path_rate}  # fmt: skip
    assert student == {k: v for k, v in base.model.items() if k != "type"}


def test_the_two_recipes_are_the_same():
    ade, camvid = load(ADE), load(CAMVID)
    for key in ("optimizer", "optim_wrapper", "custom_hooks"):
        assert ade[key] == camvid[key], key
    keys = ("init_student_from_teacher", "distill_weight", "distill_temperature",
            "feat_distill_weight", "budget_range", "budget_seed", "budget_anchors")  # fmt: skip
    assert {k: ade.model[k] for k in keys} == {k: camvid.model[k] for k in keys}


@pytest.mark.parametrize("name", [ADE, CAMVID, DEMO])
def test_the_shared_recipe_is_not_copied_into_the_config(name):
    """The configs take the recipe from ``configs/_base_/distill_recipe.py`` and pop it from
    ``_base_``: the resolved config (what a run dumps) holds it only where it is used, not a second
    time under the base's name nor under the config's own."""
    assert not {"distill_recipe", "recipe"} & set(load(name).keys())


@pytest.mark.parametrize("name", [ADE, CAMVID])
def test_distilled_model_has_the_plain_fatr_models_keys(name):
    """So ``tools/test.py`` with the plain FATR config loads a distilled checkpoint strictly."""
    distill = MODELS.build(shrink(load(name)).model)
    plain = MODELS.build(shrink(Config.fromfile(str(CONFIGS / PAIRS[name]))).model)
    assert isinstance(distill, DistillEncoderDecoder)
    plain.load_state_dict(distill.state_dict(), strict=True)
    assert set(plain.state_dict()) == set(distill.state_dict())


def test_zero_decay_groups_are_exactly_the_fatr_and_embedding_parameters():
    cfg = shrink(load(ADE), paper=True)
    model = MODELS.build(cfg.model)
    optim = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {}
    for group in optim.param_groups:
        assert group["lr"] == 1e-4
        for p in group["params"]:
            decay[names[id(p)]] = group["weight_decay"]
    assert set(decay) == set(names.values())  # every student parameter, no teacher parameter
    zero = {n for n, wd in decay.items() if wd == 0.0}
    expected = {n for n in names.values() if n.rsplit(".", 1)[-1] in ZERO_DECAY}
    assert zero == expected
    assert {n.rsplit(".", 1)[-1] for n in zero} == set(ZERO_DECAY)
    assert all(wd == 2e-5 for n, wd in decay.items() if n not in zero)
    assert not {id(p) for p in model.teacher.parameters()} & set(names)


# ---------------------------------------------------------------------------------------------
# omega2 under weight decay


def attention_pair(seed=0, dim=8, heads=2):
    """A reweighted attention (identity init) and a plain one with the same weights, float64."""
    torch.manual_seed(seed)
    fatr = Attention(dim, heads, reweight="identity", fused_attn=False).double()
    plain = Attention(dim, heads, reweight=None, fused_attn=False).double()
    plain.load_state_dict(fatr.state_dict(), strict=False)
    return fatr, plain


def literal_formula(module, x, num_dc, w1, w2):
    """The paper's Â = A_LP + (1 + w1) A_HP + (1 + w2) A_DC, built explicitly, then ÂV and proj."""
    B, n, C = x.shape
    h, d = module.num_heads, C // module.num_heads
    q, k, v = module.qkv(x).reshape(B, n, 3, h, d).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) * d**-0.5).softmax(-1)  # (B, h, n, n)
    low = torch.full_like(attn, 1.0 / n)
    dc = torch.zeros_like(attn)
    dc[..., n - num_dc :] = attn[..., n - num_dc :]
    w1, w2 = w1.view(1, h, 1, 1), w2.view(1, h, 1, 1)
    mixed = low + (1 + w1) * (attn - low) + (1 + w2) * dc
    return module.proj((mixed @ v).transpose(1, 2).reshape(B, n, C))


@torch.no_grad()
def test_omega2_is_stored_as_one_plus_w2():
    fatr, plain = attention_pair()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    out = fatr(x, num_dc=3)[0]
    assert torch.equal(fatr.omega2, torch.zeros(2, dtype=torch.float64))  # identity init
    assert_close(out, plain(x)[0], rtol=1e-12, atol=1e-12)
    assert_close(out, literal_formula(fatr, x, 3, zero, zero - 1), rtol=1e-12, atol=1e-12)
    fatr.omega2.fill_(1.0)  # stored 1 <=> the paper's w2 = 0: DC columns counted twice
    assert_close(fatr(x, num_dc=3)[0], literal_formula(fatr, x, 3, zero, zero),
                 rtol=1e-12, atol=1e-12)  # fmt: skip


def decay_steps(param, steps=5, lr=0.1, weight_decay=0.5):
    """AdamW steps with a zero gradient: weight decay alone. Yields after each step."""
    optim = torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        param.grad = torch.zeros_like(param)
        optim.step()
        yield


def test_weight_decay_pulls_omega2_towards_plain_attention():
    """Even with weight decay on omega2 (the configs exclude it), decay moves the block towards
    plain attention; at the identity init it does not move it at all. Stored as the paper's w2
    (identity at w2 = -1), decay would pull the block towards the doubled-DC formula (w2 = 0)."""
    fatr, plain = attention_pair(seed=1)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        target_plain = plain(x)[0]
        doubled = copy.deepcopy(fatr)
        doubled.omega2.fill_(1.0)
        target_doubled = doubled(x, num_dc=3)[0]

    def distances():
        with torch.no_grad():
            out = fatr(x, num_dc=3)[0]
        return (out - target_plain).norm().item(), (out - target_doubled).norm().item()

    # Identity init (omega2 = 0): a fixed point of the decay.
    for _ in decay_steps(fatr.omega2):
        assert torch.equal(fatr.omega2.data, torch.zeros(2, dtype=torch.float64))
        assert distances()[0] < 1e-12
    # Away from it: every step brings the block closer to plain attention.
    fatr.omega2.data.copy_(torch.tensor([0.6, -0.4]))
    to_plain = [distances()[0]]
    for _ in decay_steps(fatr.omega2):
        to_plain.append(distances()[0])
    assert all(a > b for a, b in zip(to_plain, to_plain[1:])), to_plain
    # The former storage: w2 itself, identity at -1; decay pulls w2 to 0, i.e. omega2 = 1 + w2
    # towards 1, the doubled-DC formula, starting from plain attention.
    w2 = torch.nn.Parameter(torch.full((2,), -1.0, dtype=torch.float64))
    fatr.omega2.data.copy_(1 + w2.data)
    to_doubled = [distances()[1]]
    for _ in decay_steps(w2):
        fatr.omega2.data.copy_(1 + w2.data)
        to_doubled.append(distances()[1])
    assert all(a > b for a, b in zip(to_doubled, to_doubled[1:])), to_doubled
    assert distances()[0] > 1e-3


# ---------------------------------------------------------------------------------------------
# Preflight


def test_preflight_missing_teacher_names_the_path(tmp_path):
    cfg = load(ADE)
    root = tmp_path / "ade"
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = str(root)
        for prefix in cfg[loader].dataset.data_prefix.values():
            (root / prefix).mkdir(parents=True, exist_ok=True)
    teacher = tmp_path / "pretrain" / "segmenter.pth"
    cfg.model.teacher_checkpoint = str(teacher)
    with pytest.raises(PreflightError, match="teacher checkpoint not found") as err:
        check_config_paths(cfg, train=True)
    message = str(err.value)
    assert str(teacher) in message and "model.teacher_checkpoint" in message
    assert "Fine-tune a trained Segmenter into FATR" in message and "\n" not in message
    check_config_paths(cfg, train=False)  # testing a distilled checkpoint needs no teacher
    teacher.parent.mkdir()
    teacher.write_bytes(b"")
    check_config_paths(cfg, train=True)
