"""Self-distillation through ``tools/train.py``, then ``tools/test.py`` with the *plain* config.

A tiny unreduced Segmenter (the teacher) is written as a checkpoint; a tiny FATR Segmenter derived
from the demo's FATR config (``configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py``) is
fine-tuned from it for a few iterations with the recipe of the ADE20K distillation config
(``configs/fatr_vit-s_mask_distill-8xb1-16k_ade20k-512x512.py``: AdamW with zero-decay groups,
EMAHook) and sampled budgets, in a subprocess as a user runs it. The checkpoint must then be a
plain FATR checkpoint: no teacher weights, EMA weights in ``state_dict``, loaded by
``tools/test.py`` with the FATR config.
"""

import json
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
from tiny_configs import TINY_MODEL, loader_options, run_tool, run_tool_here, write_tiny

from fatr_seg.models.distill import draw_keep_ratio
from fatr_seg.models.safe_globals import mmengine_safe_globals

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py"
FINETUNE_CONFIG = REPO / "configs" / "fatr_vit-s_mask_distill-8xb1-16k_ade20k-512x512.py"
MAX_ITERS = 3
register_all_modules()

# The default reduction at blocks 2 and 3 (whatever TINY_MODEL's reduction says).
PLAIN = (
    f"""
_base_ = [{str(DEMO_CONFIG)!r}]
crop_size = (64, 64)
"""
    + TINY_MODEL
    + """model['backbone']['reduction'] = dict(_delete_=True, method='fatr', layers=(2, 3))
"""
)


def distill_config(plain_path, teacher):
    recipe = Config.fromfile(str(FINETUNE_CONFIG))
    return f"""
_base_ = [{str(plain_path)!r}]
model = dict(
    type='DistillEncoderDecoder', teacher_checkpoint={str(teacher)!r},
    init_student_from_teacher=True, budget_range=(0.5, 0.9), budget_seed=3,
    backbone=dict(drop_path_rate=0.0, init_cfg=None))
optim_wrapper = dict(_delete_=True, **{recipe.optim_wrapper.to_dict()!r})
custom_hooks = {[h.to_dict() for h in recipe.custom_hooks]!r}
param_scheduler = []
"""


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill_train")
    data_root, plain, cfg = write_tiny(tmp, PLAIN)
    torch.manual_seed(0)
    teacher_model = MODELS.build(cfg.model)
    teacher = tmp / "teacher" / "iter_7.pth"
    teacher.parent.mkdir()
    torch.save({"meta": {}, "state_dict": teacher_model.state_dict()}, teacher)
    config = tmp / "tiny_fatr_distill.py"
    config.write_text(distill_config(plain, teacher))
    work = tmp / "work"
    train = run_tool(["tools/train.py", config, "--work-dir", work, "--cfg-options",
                      *loader_options(data_root), f"train_cfg.max_iters={MAX_ITERS}",
                      f"train_cfg.val_interval={MAX_ITERS}", "train_dataloader.batch_size=2",
                      f"default_hooks.checkpoint.interval={MAX_ITERS}",
                      "default_hooks.logger.interval=1"])  # fmt: skip
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    ckpt = work / f"iter_{MAX_ITERS}.pth"
    test_dir = tmp / "test"
    test = run_tool(["tools/test.py", plain, ckpt, "--work-dir", test_dir, "--cfg-options",
                     *loader_options(data_root)])  # fmt: skip
    # The distillation config tests it too, without its teacher (only training reads it): the
    # tool's main in this process (its command line ran just above).
    distill_test_dir = tmp / "distill_test"
    with pytest.MonkeyPatch.context() as mp:
        no_teacher = f"model.teacher_checkpoint={tmp / 'missing.pth'}"
        distill_test = run_tool_here(mp, ["tools/test.py", config, ckpt, "--work-dir",
                                          distill_test_dir, "--cfg-options",
                                          *loader_options(data_root), no_teacher])  # fmt: skip
    return dict(plain=plain, config=config, ckpt=ckpt, work=work, data_root=data_root,
                test=test, test_dir=test_dir, distill_test=distill_test,
                distill_test_dir=distill_test_dir, tmp=tmp)  # fmt: skip


def _metrics(test_dir):
    runs = sorted(test_dir.glob("*/*.json"))
    return json.loads(runs[-1].read_text().splitlines()[-1])


@pytest.mark.slow
def test_losses_are_logged(distilled):
    scalars = sorted(distilled["work"].glob("*/vis_data/scalars.json"))
    records = [json.loads(s) for s in scalars[-1].read_text().splitlines() if s.strip()]
    train = [r for r in records if "loss" in r]
    assert len(train) == MAX_ITERS
    for r in train:
        assert r["loss_distill"] > 0 and r["decode.loss_ce"] > 0
        assert abs(r["loss"] - r["loss_distill"] - r["decode.loss_ce"]) < 1e-3 * r["loss"]
    # One ratio per iteration, drawn from (budget_seed, the Runner's iteration).
    expected = [draw_keep_ratio((0.5, 0.9), 3, it) for it in range(MAX_ITERS)]
    assert [r["keep_ratio"] for r in train] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_checkpoint_is_a_plain_fatr_checkpoint_with_ema_weights(distilled):
    # A Runner checkpoint: its message hub's classes are allowed for this read only.
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        ckpt = torch.load(distilled["ckpt"], map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    plain = MODELS.build(Config.fromfile(str(distilled["plain"])).model)
    plain.load_state_dict(state, strict=True)
    assert set(state) == set(plain.state_dict())
    ema = ckpt["ema_state_dict"]
    assert set(ema) == {"steps"} | {f"module.{k}" for k in state}
    # EMAHook swaps: state_dict holds the averaged weights, ema_state_dict the trained ones.
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(state[key], ema[f"module.{key}"])
    teacher = torch.load(next((distilled["tmp"] / "teacher").glob("*.pth")), weights_only=True,
                         map_location="cpu")  # fmt: skip
    # 3 AdamW steps of 1e-4 from the teacher's weights; EMA 0.9998 stays nearer to them.
    moved = (ema[f"module.{key}"] - teacher["state_dict"][key]).abs().max()
    assert 0 < (state[key] - teacher["state_dict"][key]).abs().max() < moved <= 4e-4


@pytest.mark.slow
def test_plain_config_tests_the_distilled_checkpoint(distilled):
    test = distilled["test"]
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    log = test.stdout + test.stderr
    assert "do not match exactly" not in log and "missing keys" not in log
    metrics = _metrics(distilled["test_dir"])
    assert 0.0 <= metrics["mIoU"] <= 100.0
    # With the distillation config (its EMAHook swaps in the same EMA weights): same metrics.
    assert distilled["distill_test"] is None  # no error exit
    again = _metrics(distilled["distill_test_dir"])
    assert {k: again[k] for k in ("aAcc", "mIoU", "mAcc")} == {
        k: metrics[k] for k in ("aAcc", "mIoU", "mAcc")
    }


@pytest.mark.slow
def test_missing_teacher_stops_before_training_in_one_line(distilled, tmp_path, monkeypatch):
    """``tools/train.py``'s one-line exit, in this process (the command line's own one-line
    error: ``test_train_camvid.py``)."""
    missing = tmp_path / "work_dirs" / "segmenter" / "iter_10000.pth"
    exit_ = run_tool_here(monkeypatch, ["tools/train.py", distilled["config"], "--work-dir",
                                        tmp_path / "work", "--cfg-options",
                                        *loader_options(distilled["data_root"]),
                                        f"model.teacher_checkpoint={missing}"])  # fmt: skip
    assert exit_ is not None and exit_.code != 0
    err = str(exit_.code)
    assert err.startswith("error: ") and "\n" not in err
    assert str(missing) in err and "teacher checkpoint not found" in err
    assert not (tmp_path / "work").exists()
