"""``tools/benchmark.py`` times the forward targets from CUDA graphs by default on CUDA: the
switch and the plumbing on CPU, a real run on CUDA (skipped without one)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fatr_seg.models.cuda_graph import CUDAGraphForward

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("fatr_benchmark_tool_graph",
                                               REPO / "tools" / "benchmark.py")  # fmt: skip
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

BASE, FATR = "configs/baseline_vit-s_ade20k.py", "configs/fatr_ade20k.py"


@pytest.mark.parametrize(("cuda", "flags", "want"), [
    (False, [], False), (True, [], True), (True, ["--no-cuda-graph"], False),
    (True, ["--compile"], False),
])  # fmt: skip
def test_cuda_graph_is_the_default_on_cuda(monkeypatch, cuda, flags, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    args = tool.parse_args([BASE, FATR, "--quick", *flags])
    assert args.device.type == ("cuda" if cuda else "cpu") and args.cuda_graph is want


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_run_graphs_every_models_forward_modules(monkeypatch, cuda_graph):
    seen = {}

    def fake_run(bench):  # what the timed cells would call, without timing them
        for name, model in bench.models.items():
            seen[name] = {part: vars(getattr(model, part)).get("forward")
                          for part in ("backbone", "decode_head")}  # fmt: skip
        return dict(settings={})

    monkeypatch.setattr(tool.Bench, "run", fake_run)
    args = tool.parse_args([BASE, FATR, "--quick", "--device", "cpu", "--dtypes", "float32"])
    args.cuda_graph = cuda_graph
    result = tool.run(args)
    assert result["settings"]["cuda_graph"] is cuda_graph
    assert set(seen) == {"baseline_vit-s_ade20k", "fatr_ade20k"}
    for parts in seen.values():
        for fwd in parts.values():
            if cuda_graph:  # 2 shapes x 2 batch sizes x 1 dtype: none falls back for their number
                assert isinstance(fwd, CUDAGraphForward) and fwd.max_graphs == 4
            else:
                assert fwd is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_cuda_run_is_graphed(tmp_path):
    cmd = [sys.executable, "tools/benchmark.py", BASE, FATR, "--quick", "--no-progress",
           "--no-memory", "--no-macs", "--dtypes", "bfloat16",
           "--out-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "runs eager" not in proc.stdout + proc.stderr
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["settings"]["cuda_graph"] is True
    assert {r["config"] for r in result["timing"]} == {"baseline_vit-s_ade20k", "fatr_ade20k"}
