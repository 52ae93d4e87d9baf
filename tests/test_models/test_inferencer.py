"""FATRInferencer: mmseg's inferencer from CUDA graphs by default on CUDA; the plumbing and the
fallback on CPU (a stand-in capture), the real capture on CUDA (skipped without one)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from test_cuda_graph import FakeCapture

from fatr_seg.models.inferencer import FATRInferencer

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "demo" / "fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py"
IMAGES = [np.random.RandomState(i).randint(0, 255, (96, 128, 3), dtype=np.uint8) for i in (0, 1)]


def _inferencer(device="cpu", **kwargs) -> FATRInferencer:
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    return FATRInferencer(cfg, device=device, **kwargs)


def _logits(inferencer) -> list[torch.Tensor]:
    out = inferencer(IMAGES, return_datasamples=True)
    return [sample.seg_logits.data for sample in out]


@pytest.fixture(scope="module")
def eager_logits():
    return _logits(_inferencer(cuda_graph=False))


def test_cpu_runs_eager_without_a_message(eager_logits):
    logs = []
    inferencer = _inferencer(log=logs.append)
    assert inferencer.graphed == [] and "forward" not in vars(inferencer.model.backbone)
    for got, want in zip(_logits(inferencer), eager_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert logs == []


def test_graphs_by_default_one_capture_per_module(eager_logits):
    capture = FakeCapture()
    inferencer = _inferencer(graph_options=dict(capture=capture, device_type="cpu"))
    assert inferencer.graphed == ["backbone", "decode_head"]
    for _ in range(2):  # the second call replays: no new capture
        for got, want in zip(_logits(inferencer), eager_logits, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert capture.calls == 2


def test_a_failed_capture_says_one_line_and_runs_eager(eager_logits):
    logs = []
    options = dict(capture=FakeCapture(fail=True), device_type="cpu", targets=("backbone",))
    inferencer = _inferencer(log=logs.append, graph_options=options)
    for _ in range(2):
        for got, want in zip(_logits(inferencer), eager_logits, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert logs == ["CUDA graph: backbone runs eager (capture failed: RuntimeError: operation "
                    "not permitted when stream is capturing)"]  # fmt: skip


def test_cuda_graph_off_and_bad_value():
    assert _inferencer(cuda_graph=False, graph_options=dict(device_type="cpu")).graphed == []
    with pytest.raises(ValueError, match="cuda_graph must be True or False, got 'no'"):
        FATRInferencer(str(CONFIG), cuda_graph="no")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_replays_eagers_logits():
    logs = []
    graphed = _inferencer("cuda", log=logs.append)
    assert graphed.graphed == ["backbone", "decode_head"]
    eager = _inferencer("cuda", cuda_graph=False)
    for _ in range(2):
        for got, want in zip(_logits(graphed), _logits(eager), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(graphed.model.backbone.forward.graphs) == 1 and logs == []
