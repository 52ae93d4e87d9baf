"""``tools/gpu_bench.sh``'s ``cudagraph`` mode: skipped without CUDA, eager's outputs with it.

No mmseg here (``tools/gpu_bench.sh --tests`` runs this file on a bare GPU machine).
"""

import json

import pytest
import torch

from fatr_seg.analysis import gpu_bench


def test_cudagraph_cells_are_skipped_without_cuda(tmp_path):
    args = gpu_bench.parse_args(["--device", "cpu", "--dry-run", "--modes", "cudagraph", "eager",
                                 "--shapes", "64", "--out-dir", str(tmp_path)])  # fmt: skip
    result = gpu_bench.run(args, gpu_bench._progress(str(tmp_path)))
    assert [(r["mode"], r["target"]) for r in result["skipped"]] == [
        ("cudagraph", "backbone"), ("cudagraph", "segmentor")]  # fmt: skip
    assert all("CUDA" in r["reason"] for r in result["skipped"])
    assert {r["mode"] for r in result["rows"]} == {"eager"} and len(result["rows"]) == 4
    written = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert len(written["skipped"]) == 2 and len(written["rows"]) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("target", ["backbone", "segmentor"])
def test_cudagraph_replay_gives_the_eager_outputs(target):
    model = gpu_bench.build_models(tiny=True)["fatr"].cuda()
    x = torch.randn(2, 3, 96, 96, device="cuda")
    eager = gpu_bench._callables(model, target, x, torch.bfloat16, "eager", "inductor")()
    replay = gpu_bench._callables(model, target, x, torch.bfloat16, "cudagraph", "inductor")
    for _ in range(2):
        out = replay()
        torch.cuda.synchronize()
        if target == "segmentor":
            torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)
        else:
            for a, b in zip(out, eager, strict=True):
                assert torch.equal(a.source, b.source)
                torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-3, atol=1e-3)
