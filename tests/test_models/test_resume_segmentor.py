"""Save and resume a real (tiny) FATR Segmenter with mmengine's Runner under torch 2.14.

``tests/test_models/test_resume.py`` covers the checkpoint round trip with a toy model; here the
model is the FATR segmentor of
``configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py`` (shrunk to 4 blocks of width 32,
reducing at blocks 2 and 3) trained on synthetic 64×64 images, so the reduction's own parameters
(ω, DC positions), the decode head, the shuffled sampler, AdamW's moments and the LR schedule all
have to come back for the resumed run to continue exactly like an uninterrupted one. The
checkpoint allow-list comes from the ``AllowMMEngineCheckpointsHook`` the config inherits.
"""

import copy
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner
from tiny_configs import NO_EVAL, TINY_MODEL
from torch.testing import assert_close

from fatr_seg.datasets import write_dataset

REPO = Path(__file__).resolve().parents[2]
# Tiny models: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")
DEMO_CONFIG = REPO / "configs" / "demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py"
TOTAL, SPLIT = 4, 2


TINY_CONFIG = (
    """
_base_ = [{base!r}]
crop_size = (64, 64)
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=True, seed=0),
    dataset=dict(
        data_root={data_root!r},
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', reduce_zero_label=True),
            dict(type='PackSegInputs'),
        ]))
"""
    + NO_EVAL
    + TINY_MODEL
    + """optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.01),
    clip_grad=dict(max_norm=1.0),
    _delete_=True)
param_scheduler = [dict(type='PolyLR', power=1.0, eta_min=1e-5, by_epoch=False, begin=0, end=4)]
train_cfg = dict(max_iters={max_iters}, val_interval=1000)
default_hooks = dict(
    logger=dict(interval=1), checkpoint=dict(interval=2, max_keep_ckpts=-1, save_last=False))
randomness = dict(seed=0)
"""
)


class RecordHook(Hook):
    """Start iteration, optimizer state at start and after each iteration, every loss and lr."""

    def __init__(self):
        self.start_iter = None
        self.start_optim = None
        self.optim_after = {}
        self.losses = {}
        self.lrs = {}

    def before_train(self, runner):
        self.start_iter = runner.iter
        self.start_optim = copy.deepcopy(runner.optim_wrapper.optimizer.state_dict())

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        it = runner.iter + 1
        self.losses[it] = outputs["loss"].detach().clone()
        self.lrs[it] = runner.optim_wrapper.get_lr()["lr"][0]
        self.optim_after[it] = copy.deepcopy(runner.optim_wrapper.optimizer.state_dict())


def train(tmp_path, name, max_iters, resume_from=None):
    cfg_path = tmp_path / f"{name}.py"
    cfg_path.write_text(TINY_CONFIG.format(base=str(DEMO_CONFIG), max_iters=max_iters,
                                           data_root=str(tmp_path / "data")))  # fmt: skip
    cfg = Config.fromfile(str(cfg_path))
    cfg.work_dir = str(tmp_path / name)
    cfg.experiment_name = name
    if resume_from is not None:
        cfg.load_from, cfg.resume = str(resume_from), True
    runner = Runner.from_cfg(cfg)
    hook = RecordHook()
    runner.register_hook(hook, priority="LOWEST")
    runner.train()
    return runner, hook


def assert_optim_state_equal(actual, expected):
    assert actual["state"].keys() == expected["state"].keys() and expected["state"]
    for key, state in expected["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert_close(actual["state"][key][name], state[name], rtol=0, atol=0)
    for got, want in zip(actual["param_groups"], expected["param_groups"], strict=True):
        assert got["lr"] == want["lr"]


@pytest.mark.slow
@pytest.mark.skipif(
    not DEMO_CONFIG.is_file(),
    reason="configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py not written yet",
)
def test_resumed_segmentor_continues_like_an_uninterrupted_run(tmp_path):
    write_dataset(tmp_path / "data", num_train=6, num_val=1, size=64, seed=0, progress=False)
    full, full_hook = train(tmp_path, "full", TOTAL)
    first, _ = train(tmp_path, "first", SPLIT)
    ckpt = tmp_path / "first" / f"iter_{SPLIT}.pth"
    assert ckpt.is_file()
    resumed, hook = train(tmp_path, "resumed", TOTAL, resume_from=ckpt)

    # Same iteration, same optimizer state (AdamW moments, step and scheduled lr).
    assert hook.start_iter == SPLIT
    assert sorted(hook.losses) == list(range(SPLIT + 1, TOTAL + 1))
    assert_optim_state_equal(hook.start_optim, full_hook.optim_after[SPLIT])
    # Same next loss: it depends on the restored weights and on the sampler's position.
    for it in range(SPLIT + 1, TOTAL + 1):
        assert_close(hook.losses[it], full_hook.losses[it], rtol=0, atol=0)
        assert hook.lrs[it] == full_hook.lrs[it]
    assert_optim_state_equal(hook.optim_after[TOTAL], full_hook.optim_after[TOTAL])
    assert_close(resumed.model.state_dict(), full.model.state_dict(), rtol=0, atol=0)

    # The check has teeth: the losses change from iteration to iteration, and the reduction's own
    # parameters (DC positional terms) are trained and restored.
    losses = [full_hook.losses[i].item() for i in range(1, TOTAL + 1)]
    assert len(set(losses)) == TOTAL
    dc_pos = [k for k in full.model.state_dict() if k.endswith("reducer.dc_pos")]
    assert len(dc_pos) == 2
    assert all(full.model.state_dict()[k].abs().max() > 0 for k in dc_pos)
