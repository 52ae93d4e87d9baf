"""CUDA graphs for inference (issue 24, item 3): the plumbing and the fallback on CPU (a
stand-in capture), the real capture on CUDA (skipped without one)."""

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
from mmengine.config import Config, ConfigDict
from torch import nn

from fatr_seg.layers import FATRVisionTransformer
from fatr_seg.layers.compact import CompactTokens
from fatr_seg.models.compile import restore_eager
from fatr_seg.models.cuda_graph import (
    CUDAGraphForward,
    CUDAGraphInferenceHook,
    _leaves,
    _map,
    _signature,
    add_cuda_graph_hook,
    capture_cuda_graph,
)

REPO = Path(__file__).resolve().parents[2]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class FakeCapture:
    """Stands in for capture_cuda_graph on CPU: counts captures, replays by running eagerly."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, fn, args, pool):
        self.calls += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return lambda new_args: fn(*new_args)


def graphed(module, capture, **kw):
    logs = []
    fwd = CUDAGraphForward(module, log=logs.append, capture=capture, device_type="cpu", **kw)
    module.forward = fwd
    return fwd, logs


def test_one_capture_per_signature_then_eager_with_one_line():
    net = nn.Linear(4, 3).eval()
    capture = FakeCapture()
    fwd, logs = graphed(net, capture, max_graphs=2, name="backbone")
    with torch.no_grad():
        for rows in (2, 2, 5, 2, 5):
            assert net(torch.randn(rows, 4)).shape == (rows, 3)
        assert capture.calls == 2 and logs == []
        net(torch.randn(7, 4))
        net(torch.randn(8, 4))  # a fourth shape: still one message
    assert capture.calls == 2
    assert logs == ["CUDA graph: backbone runs eager (input shapes vary: more than 2 captured)"]


def test_a_failed_capture_falls_back_to_eager_for_good():
    net = nn.Linear(4, 3).eval()
    capture = FakeCapture(fail=True)
    fwd, logs = graphed(net, capture, name="decode_head")
    x = torch.randn(2, 4)
    with torch.no_grad():
        want = fwd.eager(x)
        assert torch.equal(net(x), want) and torch.equal(net(x), want)
    assert capture.calls == 1 and len(logs) == 1
    assert logs[0] == ("CUDA graph: decode_head runs eager (capture failed: RuntimeError: "
                       "operation not permitted when stream is capturing)")  # fmt: skip


def test_a_change_of_the_skipped_reweighting_captures_anew():
    """A graph bakes in whether each block skips its identity reweighting (omega1 = 0): once a
    loaded omega1 is not 0, the same input shape gets a graph of its own, not the old replay."""
    torch.manual_seed(0)
    red = dict(method="fatr", layers=(2,))
    vit = FATRVisionTransformer(img_size=32, patch_size=8, embed_dims=16, num_layers=4,
                                num_heads=2, reduction=red).eval()  # fmt: skip
    capture = FakeCapture()
    graphed(vit, capture)
    x = torch.randn(1, 3, 32, 32)
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    with torch.no_grad():
        vit(x)
        vit(x)
        assert capture.calls == 1 and vit.blocks[3].attn.hp_is_identity()
        vit.load_state_dict({**state, "blocks.3.attn.omega1": torch.full((2,), 0.5)})
        vit(x)
    assert capture.calls == 2 and not vit.blocks[3].attn.hp_is_identity()


def test_training_autograd_and_keywords_run_eager_silently():
    net = nn.Linear(4, 3)
    capture = FakeCapture()
    fwd, logs = graphed(net, capture)
    net(torch.randn(2, 4))  # training mode
    net.eval()
    net(torch.randn(2, 4))  # autograd on
    with torch.no_grad():
        fwd(input=torch.randn(2, 4))  # keyword arguments
    assert capture.calls == 0 and logs == []


def test_trees_of_compact_tokens():
    tokens = CompactTokens(torch.randn(1, 3, 2), torch.tensor([[0, 1, 2, 2]]), torch.ones(1, 3),
                           (2, 2))  # fmt: skip
    tree = ([tokens, torch.zeros(2)], {"a": torch.ones(1)})
    assert len(_leaves(tree)) == 5
    doubled = _map(tree, lambda t: t * 2)
    assert isinstance(doubled[0][0], CompactTokens) and doubled[0][0].hw_shape == (2, 2)
    assert torch.equal(doubled[0][0].tokens, tokens.tokens * 2)
    assert _signature(tree) == _signature(doubled)
    assert _signature(tree) != _signature(([tokens, torch.zeros(3)], {"a": torch.ones(1)}))


class _Runner:
    def __init__(self, model):
        self.model = model
        self.messages = []
        self.logger = self

    def info(self, text):
        self.messages.append(text)


def test_hook_leaves_a_cpu_model_eager():
    model = nn.Module()
    model.backbone = nn.Linear(2, 2)
    runner = _Runner(model)
    hook = CUDAGraphInferenceHook()
    hook.before_test(runner)
    assert "forward" not in vars(model.backbone)
    assert runner.messages == ["CUDAGraphInferenceHook: the model is on cpu: eager"]
    hook.after_test(runner)


def test_add_cuda_graph_hook_once_and_not_beside_compile():
    cfg = Config(dict(custom_hooks=[dict(type="EMAHook")]))
    add_cuda_graph_hook(cfg)
    add_cuda_graph_hook(cfg)
    assert [h["type"] for h in cfg.custom_hooks] == ["EMAHook", "CUDAGraphInferenceHook"]
    compiled = Config(dict(custom_hooks=[dict(type="CompileInferenceHook")]))
    add_cuda_graph_hook(compiled)
    assert compiled.custom_hooks == [ConfigDict(type="CompileInferenceHook")]


def _test_tool():
    spec = importlib.util.spec_from_file_location("test_tool", REPO / "tools" / "test.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize(("flags", "want"), [((), "graph"), (("no_cuda_graph",), None),
                                             (("compile",), "compile")])  # fmt: skip
def test_tools_test_graphs_by_default_on_cuda(monkeypatch, cuda, flags, want):
    tool = _test_tool()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = Config.fromfile(str(REPO / "configs" / "fatr_ade20k.py"))
    args = argparse.Namespace(checkpoint=__file__, mode=None, keep_ratio=None, amp=False,
                              out=None, show_dir=None, compile="compile" in flags,
                              no_cuda_graph="no_cuda_graph" in flags)  # fmt: skip
    tool.configure(cfg, args)
    hooks = {h["type"]: h for h in cfg.get("custom_hooks") or []}
    assert ("CUDAGraphInferenceHook" in hooks) == (cuda and want == "graph")
    if "compile" in flags:
        mode = hooks["CompileInferenceHook"].get("mode")
        assert mode == ("reduce-overhead" if cuda else None)


@CUDA
@pytest.mark.parametrize("method", ["fatr", "tome", "fatr_paper"])
def test_reduced_backbone_replays_eagers_outputs(method):
    torch.manual_seed(0)
    model = FATRVisionTransformer(img_size=64, patch_size=8, embed_dims=48, num_layers=12,
                                  num_heads=3, reduction=dict(method=method))  # fmt: skip
    model = model.cuda().eval()
    logs = []
    model.forward = CUDAGraphForward(model, log=logs.append)
    with torch.inference_mode():
        for size in (64, 64, 96):
            x = torch.randn(2, 3, size, size, device="cuda")
            torch.testing.assert_close(model(x)[0], model.forward.eager(x)[0])
    assert len(model.forward.graphs) == 2 and logs == []
    del model.forward


@CUDA
def test_capture_replays_new_inputs():
    net = nn.Linear(4, 3).cuda().eval()
    with torch.no_grad():
        replay = capture_cuda_graph(net.forward, (torch.randn(2, 4, device="cuda"),))
        x = torch.randn(2, 4, device="cuda")
        torch.testing.assert_close(replay((x,)), net(x))


def test_restore_eager_after_graphing():
    model = nn.Module()
    model.backbone = nn.Linear(2, 2)
    model.backbone.forward = CUDAGraphForward(model.backbone)
    restore_eager(model)
    assert "forward" not in vars(model.backbone)
