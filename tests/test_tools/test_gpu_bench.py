"""``tools/gpu_bench.sh`` without a GPU: its models are the configs', its logic runs on CPU.

No GPU was lent to this project, so the script's CUDA run is not tested here; ``--device cpu
--dry-run`` runs every step of it (model building, both targets, eager and compiled, memory,
the markdown table) on a tiny model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmseg.registry import MODELS as MMSEG_MODELS
from torch.testing import assert_close

from fatr_seg.analysis.gpu_bench import HEAD_S, MODELS, VIT_S, build_models
from fatr_seg.layers import ReductionConfig

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")


def config(name):
    cfg = Config.fromfile(str(REPO / "configs" / name))
    cfg.model.backbone.init_cfg = None
    return cfg


def test_models_are_the_configs():
    for name, path in (("baseline", "baseline_vit-s_ade20k.py"), ("fatr", "fatr_ade20k.py")):
        bb, head = config(path).model.backbone, config(path).model.decode_head
        for key, value in VIT_S.items():
            assert bb[key] == value, (path, key)
        assert bb.compact_output is True and head.type == "FATRSegmenterHead"
        for key, value in HEAD_S.items():
            assert head[key] == value, (path, key)
        want = ReductionConfig.from_dict(bb.reduction, depth=12)
        assert ReductionConfig.from_dict(MODELS[name], depth=12) == want


@pytest.mark.slow
def test_segmentor_equals_mmseg_encode_decode_with_the_same_weights():
    """The pure-torch segmentor (no mmseg) gives the config model's encode_decode logits."""
    ours = build_models()["fatr"]
    cfg = config("fatr_ade20k.py")
    cfg.model.type = "EncoderDecoder"
    ref = MMSEG_MODELS.build(cfg.model).eval()
    ref.backbone.load_state_dict(ours.backbone.state_dict(), strict=True)
    ref.decode_head.load_state_dict(ours.head.state_dict(), strict=True)
    x = torch.randn(1, 3, 128, 160)
    metas = [dict(img_shape=(128, 160), ori_shape=(128, 160), pad_shape=(128, 160))]
    with torch.no_grad():
        assert_close(ours(x), ref.encode_decode(x, metas), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_dry_run_on_cpu_writes_the_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    # One size (the dry run's default two sizes are measured by
    # test_each_model_and_size_compiles_once).
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_bench.sh"), str(tmp_path),
                           "--device", "cpu", "--dry-run", "--compile-backend", "eager",
                           "--shapes", "64"],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    cells = {(r["shape"], r["target"], r["mode"], r["model"]) for r in result["rows"]}
    assert cells == {(64, t, m, n) for t in ("backbone", "segmentor")
                     for m in ("eager", "compiled") for n in ("baseline", "fatr")}  # fmt: skip
    assert all(r["median_ms"] > 0 and r["peak_mib"] >= 0 for r in result["rows"])
    table = (tmp_path / "gpu_bench.md").read_text()
    assert table.count("| fatr |") == 4 and "speed-up vs baseline" in table
    assert proc.stdout.count(" fatr: ") == 4  # one progress line per measured cell and model


def test_peers_run_beside_the_default_at_the_frontier_budgets(tmp_path):
    from fatr_seg.analysis import gpu_bench
    from fatr_seg.layers import FATRVisionTransformer

    args = gpu_bench.parse_args(["--device", "cpu", "--dry-run", "--modes", "eager", "--shapes",
                                 "64", "--targets", "backbone", "--peers", "--out-dir",
                                 str(tmp_path)])  # fmt: skip
    result = gpu_bench.run(args)
    assert [r["model"] for r in result["rows"]] == ["baseline", "fatr", "tome", "algm"]
    assert result["settings"]["peers"] is True
    models = gpu_bench.build_models(tiny=True, peers=True)
    for name, want in (("tome", dict(method="tome", keep_ratio=0.5)),
                       ("algm", dict(method="algm", keep_ratio=0.58))):  # fmt: skip
        ref = FATRVisionTransformer(img_size=64, reduction=want, compact_output=True,
                                    **gpu_bench.TINY).reduction  # fmt: skip
        assert models[name].backbone.reduction == ref, name


def test_cpu_without_dry_run_is_refused(capsys):
    from fatr_seg.analysis import gpu_bench

    with pytest.raises(SystemExit) as exit_:
        gpu_bench.parse_args(["--device", "cpu"])
    assert exit_.value.code == 2 and "--dry-run" in capsys.readouterr().err


def test_every_cell_is_written_as_it_finishes_with_its_profiles(tmp_path):
    """A run stopped from outside (a device lease ending) keeps the cells it finished; with
    ``--profile``, one torch.profiler table per cell and model, in profiles.txt only."""
    from fatr_seg.analysis import gpu_bench

    args = gpu_bench.parse_args(["--device", "cpu", "--dry-run", "--modes", "eager", "--shapes",
                                 "64", "--profile", "--out-dir", str(tmp_path)])  # fmt: skip
    written = []
    progress = gpu_bench._progress(str(tmp_path))

    def on_cell(result):
        progress(result)
        written.append(json.loads((tmp_path / "gpu_bench.json").read_text()))

    result = gpu_bench.run(args, on_cell)
    assert [len(w["rows"]) for w in written] == [2, 4]  # baseline and fatr, per target
    assert [r["target"] for r in written[0]["rows"]] == ["backbone", "backbone"]
    assert written[-1]["rows"] == json.loads(json.dumps(result["rows"]))
    assert {r["mode"] for r in result["rows"]} == {"eager"}  # --modes eager: no compiled cell
    assert "| 64² | 16 | segmentor | eager | fatr |" in (tmp_path / "gpu_bench.md").read_text()

    text = (tmp_path / "profiles.txt").read_text()
    headers = [line for line in text.splitlines() if line.startswith("==== ")]
    assert headers == [f"==== eager {t} 64² batch 2 {m}" for t in ("backbone", "segmentor")
                       for m in ("baseline", "fatr")]  # fmt: skip
    sections = text.split("==== ")[1:]
    assert all("aten::" in s and "Self CPU" in s for s in sections)
    assert "aten::upsample_bilinear2d" in sections[2] and "upsample" not in sections[0]
    assert all("profiles" not in w for w in written)


def test_each_model_and_size_compiles_once(tmp_path, monkeypatch):
    """The segmentor cells reuse the backbone graphs of the backbone cells (compile time is
    device time on a lent GPU): per model, one backbone and one head graph per input size."""
    from torch._dynamo.testing import CompileCounter

    from fatr_seg.analysis import gpu_bench

    counters = []

    def counting_parts(model, backend):
        parts = []
        for module in (model.backbone, model.head):
            counters.append(CompileCounter())
            parts.append(torch.compile(module, backend=counters[-1], fullgraph=True,
                                       dynamic=False))  # fmt: skip
        return tuple(parts)

    monkeypatch.setattr(gpu_bench, "compiled_parts", counting_parts)
    torch._dynamo.reset()
    args = gpu_bench.parse_args(["--device", "cpu", "--dry-run", "--modes", "compiled",
                                 "--out-dir", str(tmp_path)])  # fmt: skip
    result = gpu_bench.run(args)
    torch._dynamo.reset()
    assert not result["skipped"] and len(result["rows"]) == 8  # 2 sizes x 2 targets x 2 models
    # baseline backbone, baseline head, fatr backbone, fatr head: each once per size (64, 96)
    assert [c.frame_count for c in counters] == [2, 2, 2, 2]
