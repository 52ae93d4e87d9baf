"""mmengine Runner resume under torch >= 2.6 (``weights_only=True`` by default).

A toy model keeps this independent of mmseg/mmcv: what is under test is the checkpoint round trip
through mmengine's own loader, which every mmseg training shares.
"""

import copy
import io
import pickle

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint
from torch import nn
from torch.utils.data import Dataset

from fatr_seg.models import AllowMMEngineCheckpointsHook, allow_mmengine_checkpoints


class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x, y, mode="loss"):
        out = self.net(x)
        if mode == "loss":
            return dict(loss=((out - y) ** 2).mean())
        return out


class ToyDataset(Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(x=self.x[i], y=self.y[i])


class RecordHook(Hook):
    """Records the start iteration, the optimizer state at start and every iteration's loss."""

    def __init__(self):
        self.start_iter = None
        self.start_optim_state = None
        self.losses = {}

    def before_train(self, runner):
        self.start_iter = runner.iter
        self.start_optim_state = copy.deepcopy(runner.optim_wrapper.optimizer.state_dict())

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses[runner.iter + 1] = outputs["loss"].detach().clone()


def make_runner(work_dir, name, max_iters, resume_from=None):
    hook = RecordHook()
    torch.manual_seed(0)  # the model is built before the Runner seeds anything
    runner = Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        experiment_name=name,
        train_dataloader=dict(
            dataset=ToyDataset(),
            sampler=dict(type="DefaultSampler", shuffle=True, seed=0),
            batch_size=4,
            num_workers=0,
            collate_fn=dict(type="default_collate"),
        ),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-2, weight_decay=0.01)),
        param_scheduler=dict(type="LinearLR", start_factor=0.5, by_epoch=False, begin=0, end=4),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(
            checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False),
            logger=dict(type="LoggerHook", interval=1),
        ),
        # Installs the allow-list before the Runner resumes (importing fatr_seg does not).
        custom_hooks=[hook, AllowMMEngineCheckpointsHook()],
        load_from=resume_from,
        resume=resume_from is not None,
        randomness=dict(seed=0),
        default_scope="mmengine",
    )
    return runner, hook


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Runner checkpoint after 2 of 4 planned iterations."""
    work_dir = tmp_path_factory.mktemp("first")
    runner, _ = make_runner(work_dir, "first", max_iters=2)
    runner.train()
    return work_dir / "iter_2.pth"


def test_resume_continues_like_an_uninterrupted_run(checkpoint, tmp_path):
    full, full_hook = make_runner(tmp_path / "full", "full", max_iters=4)
    full.train()

    resumed, hook = make_runner(tmp_path / "resumed", "resumed", 4, resume_from=str(checkpoint))
    resumed.train()

    assert hook.start_iter == 2
    saved = _load_checkpoint(str(checkpoint), map_location="cpu")
    assert saved["optimizer"]["state"], "AdamW state missing from the checkpoint"
    for key, state in saved["optimizer"]["state"].items():
        restored = hook.start_optim_state["state"][key]
        torch.testing.assert_close(restored["exp_avg"], state["exp_avg"])
        torch.testing.assert_close(restored["exp_avg_sq"], state["exp_avg_sq"])
    assert sorted(hook.losses) == [3, 4]
    # Iteration 3 checks model weights and data order; iteration 4 also the AdamW moments and lr.
    for it in (3, 4):
        torch.testing.assert_close(hook.losses[it], full_hook.losses[it])
    torch.testing.assert_close(resumed.model.state_dict(), full.model.state_dict())


def test_checkpoint_needs_the_allow_list(checkpoint):
    allow_mmengine_checkpoints()
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            torch.load(checkpoint)
    finally:
        torch.serialization.add_safe_globals(registered)

    ckpt = _load_checkpoint(str(checkpoint), map_location="cpu")
    assert ckpt["meta"]["iter"] == 2
    assert isinstance(ckpt["message_hub"]["log_scalars"]["train/loss"], HistoryBuffer)


def test_allow_list_refuses_other_getattr():
    allow_mmengine_checkpoints()
    buf = io.BytesIO()
    torch.save({"f": HistoryBuffer.__init__}, buf)  # pickled as getattr(HistoryBuffer, ...)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="only public HistoryBuffer methods"):
        torch.load(buf)
