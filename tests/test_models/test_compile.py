"""The segmentor under ``torch.compile``: ``encode_decode`` as one graph, and the test-time hook.

``encode_decode`` (backbone, decode head, resize of the logits) compiles with ``fullgraph=True``
on CPU, with ``FATRSegmenterHead`` on the compact output (inductor) and with mmseg's stock
Segmenter head on the restored grid (AOTAutograd), and gives eager's logits.
``CompileInferenceHook`` compiles the modules for validation and testing only and keeps their
graphs between runs.
"""

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmseg.registry import MODELS
from torch._dynamo.testing import CompileCounterWithBackend
from torch.testing import assert_close

from fatr_seg.models import CompileInferenceHook, add_compile_hook, compile_modules
from fatr_seg.models.compile import restore_eager

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "fatr_ade20k.py")


def build(reduction, head="FATRSegmenterHead", compact=True):
    cfg = Config.fromfile(CONFIG).model
    cfg.type = "BatchedSlideEncoderDecoder"
    bb = cfg.backbone
    bb.update(img_size=(64, 64), embed_dims=32, num_layers=3, num_heads=2, init_cfg=None,
              drop_path_rate=0.0, compact_output=compact)  # fmt: skip
    bb.pop("reduction")
    bb["reduction"] = None if reduction is None else dict(reduction, layers=(1, 2, 3))
    cfg.decode_head.update(type=head, in_channels=32, channels=32, embed_dims=32, num_heads=2,
                           num_layers=1, num_classes=5)  # fmt: skip
    cfg.test_cfg = dict(mode="slide", crop_size=(64, 64), stride=(48, 48))
    torch.manual_seed(0)
    return MODELS.build(cfg).eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "head", "compact", "backend"),
    [
        # the configs' head on the reduced token set, through inductor
        ("fatr", "FATRSegmenterHead", True, "inductor"),
        # mmseg's head on the full grid: one graph and eager's logits through AOTAutograd
        # (inductor's code for the full-grid restore: test_compile_layers.py)
        ("fatr_paper", "SegmenterMaskTransformerHead", False, "aot_eager"),
    ],
)
def test_encode_decode_compiles_to_one_graph(method, head, compact, backend):
    model = build(dict(method=method), head, compact)
    counter = CompileCounterWithBackend(backend)
    fn = torch.compile(model.encode_decode, backend=counter, fullgraph=True, dynamic=False)
    x = torch.randn(2, 3, 64, 80)
    metas = [dict(img_shape=(64, 80), ori_shape=(64, 80), pad_shape=(64, 80))] * 2
    with torch.no_grad():
        assert_close(fn(x, metas), model.encode_decode(x, metas), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1 and counter.op_count > 0


def test_compile_modules_keeps_state_dict_and_restores_eager():
    model = build(dict(method="fatr"))
    keys = list(model.state_dict())
    assert compile_modules(model, backend="eager", fullgraph=True) == ["backbone", "decode_head"]
    assert list(model.state_dict()) == keys  # checkpoints load as before
    assert "forward" in vars(model.backbone) and "forward" in vars(model.decode_head)
    x = torch.randn(1, 3, 100, 90)  # slide inference: 2x2 windows of 64
    with torch.no_grad():
        compiled = model.slide_inference(x, [dict(ori_shape=(100, 90))])
        restore_eager(model)
        assert "forward" not in vars(model.backbone)
        eager = model.slide_inference(x, [dict(ori_shape=(100, 90))])
    assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_hook_compiles_for_validation_only_and_keeps_graphs():
    model = build(dict(method="fatr"))
    runner = SimpleNamespace(model=model, logger=logging.getLogger("test_compile_hook"))
    hook = CompileInferenceHook(backend="eager", fullgraph=True)
    hook.before_val(runner)
    first = vars(model.backbone)["forward"]
    with torch.no_grad():
        model.backbone(torch.randn(1, 3, 64, 64))
    hook.after_val(runner)
    assert "forward" not in vars(model.backbone)  # training runs eager
    hook.before_test(runner)
    assert vars(model.backbone)["forward"] is first  # the same compiled callable, its graphs
    hook.after_test(runner)


def test_add_compile_hook_once():
    cfg = Config(dict(custom_hooks=[dict(type="EMAHook")]))
    add_compile_hook(cfg, fullgraph=True)
    add_compile_hook(cfg)
    assert [h["type"] for h in cfg.custom_hooks] == ["EMAHook", "CompileInferenceHook"]
    assert cfg.custom_hooks[1]["fullgraph"] is True
    empty = Config(dict())
    add_compile_hook(empty)
    assert empty.custom_hooks == [ConfigDict(type="CompileInferenceHook")]


def test_bad_target_is_named():
    model = build(None)
    model.not_a_module = 3
    with pytest.raises(ValueError, match="'not_a_module'.*no module"):
        compile_modules(model, ("not_a_module",))
