"""The benchmark's ``train`` target: one training step (forward, loss, backward) per call.

Checked against mmengine's own loss convention (``BaseModel.parse_losses``) and autograd on the
same model, not against timings.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fatr_seg.analysis.benchmark_models import (
    build_segmentor,
    forward_fn,
    make_images,
    make_labels,
    train_samples,
)
from fatr_seg.datasets.synthetic import generate_sample

REPO = Path(__file__).resolve().parents[2]
FATR = str(REPO / "configs" / "fatr_ade20k.py")
pytestmark = pytest.mark.usefixtures("single_thread")

_spec = importlib.util.spec_from_file_location(
    "fatr_benchmark_cli", REPO / "tools" / "benchmark.py"
)
benchmark_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark_tool)


def test_labels_are_the_images_labels_with_reduce_zero_label():
    labels = make_labels(3, (48, 40), seed=5)
    assert labels.shape == (3, 48, 40) and labels.dtype == torch.int64
    for i in range(3):
        _, raw = generate_sample(np.random.default_rng([5, i]), (48, 40))
        raw = torch.from_numpy(raw.astype(np.int64))
        assert torch.equal(labels[i] == 255, raw == 0)
        assert torch.equal(labels[i][raw > 0], raw[raw > 0] - 1)
    # The images of make_images with the same seed are the same samples.
    image, _ = generate_sample(np.random.default_rng([5, 2]), (48, 40))
    x = make_images(3, (48, 40), ([0.0] * 3, [1.0] * 3), seed=5)
    assert_close(x[2], torch.from_numpy(image).permute(2, 0, 1).float(), atol=0, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    model, _, norm = build_segmentor(FATR, tiny=True)
    x = make_images(2, (64, 64), norm, seed=0)
    return model, x, make_labels(2, (64, 64), seed=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_train_step_equals_mmengine_loss_and_autograd(tiny):
    model, x, labels = tiny
    step = forward_fn(model, "train", x, "float32", labels)
    torch.manual_seed(0)  # drop path draws the same masks in both
    loss = step()
    got = _grads(model)
    assert not model.training  # the mode it had is back

    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(0)
    ref_loss, log_vars = model.parse_losses(model.loss(x, train_samples(labels)))
    ref_loss.backward()
    model.eval()
    want = _grads(model)

    assert torch.isfinite(loss) and float(loss) > 0
    assert_close(loss, ref_loss.detach(), atol=0, rtol=0)
    assert float(log_vars["decode.loss_ce"]) == pytest.approx(float(loss))
    assert got.keys() == want.keys()
    # The whole backbone learns: patch embedding, every block, and the reweighting.
    assert "backbone.patch_embed.proj.weight" in got
    assert any(".attn.omega1" in n for n in got)
    for name in want:
        assert_close(got[name], want[name], atol=0, rtol=0, msg=name)


def test_train_step_does_not_accumulate_gradients(tiny):
    model, x, labels = tiny
    step = forward_fn(model, "train", x, "float32", labels)
    torch.manual_seed(1)
    step()
    once = _grads(model)
    torch.manual_seed(1)
    step()
    for name, g in _grads(model).items():
        assert_close(g, once[name], atol=0, rtol=0, msg=name)
    model.train()  # a model in train mode stays in train mode
    step()
    assert model.training
    model.eval()


def test_train_step_needs_matching_labels(tiny):
    model, x, labels = tiny
    with pytest.raises(ValueError, match="needs labels"):
        forward_fn(model, "train", x, "float32")
    with pytest.raises(ValueError, match="do not match"):
        forward_fn(model, "train", x, "float32", labels[:, :32])


def test_train_is_opt_in():
    args = benchmark_tool.parse_args(["--device", "cpu"])
    assert args.targets == ["backbone", "segmentor"]
    args = benchmark_tool.parse_args(["--device", "cpu", "--targets", "train"])
    assert args.targets == ["train"]
