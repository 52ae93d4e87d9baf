"""``--keep-ratio`` of ``tools/test.py`` and ``tools/benchmark.py``, and ``tools/test.py`` on the
FATR config with an unreduced model's checkpoint (FATR training-free).

A tiny FATR Segmenter derived from
``configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py`` (blocks 2 and 3 reduce) is
evaluated on 4 synthetic validation images, in a subprocess as a user runs the tool, with
``--out`` so that its predictions come back. The reference is mmseg's own inference
(``init_model`` + ``inference_model``) of the same config and checkpoint in this process, with
the budget set by ``backbone.set_keep_ratio``.
"""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_configs import REPO, TINY_MODEL, loader_options, run_tool, write_tiny
from tiny_segmentors import randomize_

from fatr_seg.analysis.benchmark_models import config_variants
from fatr_seg.models.keep_ratio import KeepRatioError

DEMO = REPO / "configs" / "demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py"
BASELINE = REPO / "configs" / "demo/segmenter_vit-t_fcn_1xb8-200_synthetic-192x192.py"
TINY = (
    """
_base_ = [{base!r}]
crop_size = (64, 64)
"""
    + TINY_MODEL
)

_spec = importlib.util.spec_from_file_location(
    "fatr_benchmark_tool", REPO / "tools" / "benchmark.py"
)
benchmark_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark_tool)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Data, the tiny FATR config, and a checkpoint of the same model without reduction."""
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    tmp = tmp_path_factory.mktemp("keep_ratio")
    data, config, cfg = write_tiny(tmp, TINY.format(base=str(DEMO)))
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = randomize_(MODELS.build(cfg.model), seed=0)
    ckpt = tmp / "unreduced.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, ckpt)
    return dict(tmp=tmp, data=data, config=config, ckpt=ckpt)


def _test(tiny, name, *extra):
    """``tools/test.py`` with --out; its output and the predicted label maps by image."""
    out = tiny["tmp"] / name
    proc = run_tool(["tools/test.py", tiny["config"], tiny["ckpt"], "--work-dir", out / "work",
                     "--out", out / "pred", *extra, "--cfg-options",
                     *loader_options(tiny["data"])])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    preds = {p.stem: np.asarray(Image.open(p)) for p in sorted((out / "pred").glob("*.png"))}
    assert len(preds) == 4
    return proc.stdout + proc.stderr, preds


def _reference(tiny, keep_ratio=None):
    """mmseg's inference in this process; the label maps as IoUMetric saves them (+1)."""
    from mmengine.config import Config
    from mmseg.apis import inference_model, init_model

    cfg = Config.fromfile(str(tiny["config"]))
    cfg.test_dataloader.dataset.data_root = str(tiny["data"])
    model = init_model(cfg, str(tiny["ckpt"]), device="cpu")
    if keep_ratio is not None:
        model.backbone.set_keep_ratio(keep_ratio)
    images = sorted((tiny["data"] / "images" / "validation").glob("*.jpg"))
    with torch.no_grad():
        return {p.stem: inference_model(model, str(p)).pred_sem_seg.data[0].numpy() + 1
                for p in images}  # fmt: skip


@pytest.mark.slow
def test_test_tool_runs_fatr_training_free_and_at_other_budgets(tiny):
    log, preds = _test(tiny, "default")
    # The unreduced checkpoint loads cleanly: the hook's line instead of mmengine's warning.
    assert "the checkpoint is the unreduced model's" in log
    assert "do not match" not in log and "missing keys" not in log
    reference = _reference(tiny)
    assert preds.keys() == reference.keys()
    for stem, pred in preds.items():
        np.testing.assert_array_equal(pred, reference[stem])

    # One ratio per reduction layer, through the tool; one number for all of them is the same
    # config (the check the tool runs: below, in this process).
    _, at_budget = _test(tiny, "keep_0.25_0.9", "--keep-ratio", "0.25", "0.9")
    expected = _reference(tiny, (0.25, 0.9))
    for stem, pred in at_budget.items():
        np.testing.assert_array_equal(pred, expected[stem])
    # The budget changed the predictions (else this test could not fail).
    assert any((at_budget[s] != preds[s]).any() for s in preds)
    from mmengine.config import Config

    from fatr_seg.models.keep_ratio import set_config_keep_ratio

    one, each = (Config.fromfile(str(tiny["config"])) for _ in range(2))
    assert set_config_keep_ratio(one, ["0.25"], "tiny") == (0.25, 0.25)
    assert set_config_keep_ratio(each, ["0.25", "0.25"], "tiny") == (0.25, 0.25)
    assert one.model.backbone.reduction == each.model.backbone.reduction
    assert tuple(one.model.backbone.reduction.keep_ratio) == (0.25, 0.25)


@pytest.mark.slow
def test_test_tool_bad_keep_ratio_is_one_line(tiny):
    """The tool's one line (run once: every preflight error takes the same way out), then the
    message of each kind of bad value, from the check the tool runs before building anything."""
    from mmengine.config import Config

    from fatr_seg.models.keep_ratio import set_config_keep_ratio

    proc = run_tool(["tools/test.py", BASELINE, tiny["ckpt"], "--keep-ratio", "0.5",
                     "--work-dir", tiny["tmp"] / "bad", "--cfg-options",
                     *loader_options(tiny["data"])])  # fmt: skip
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: --keep-ratio 0.5: ") and "has no token reduction" in err[-1]
    assert "Traceback" not in proc.stderr
    cfg = Config.fromfile(str(tiny["config"]))
    for values, message in (
        (["0.5", "0.6", "0.7"], "reduces at 2 layers (2, 3); give one number in (0, 1] or 2"),
        (["x"], "'x' is not a number; give a number in (0, 1], or one per reduction layer"),
    ):
        with pytest.raises(KeepRatioError) as err:
            set_config_keep_ratio(cfg, values, str(tiny["config"]))
        assert str(err.value).startswith(f"--keep-ratio {' '.join(values)}: ")
        assert message in str(err.value)


def test_benchmark_keep_ratio_arguments(capsys):
    fatr, base = "configs/fatr_ade20k.py", "configs/baseline_vit-s_ade20k.py"
    args = benchmark_tool.parse_args([base, fatr, "--device", "cpu", "--keep-ratio", "0.5",
                                      "0.5,0.6,0.7"])  # fmt: skip
    assert args.keep_ratio == [0.5, (0.5, 0.6, 0.7)]
    assert config_variants(args.configs, args.keep_ratio) == [
        ("baseline_vit-s_ade20k", base, None),
        ("fatr_ade20k@keep0.5", fatr, (0.5, 0.5, 0.5)),
        ("fatr_ade20k@keep0.5,0.6,0.7", fatr, (0.5, 0.6, 0.7)),
    ]
    bad = [(["1.5"], "1.5 is outside (0, 1]"), (["abc"], "'abc' is not a number"),
           (["0.5,0.6"], "reduces at 3 layers (2, 5, 8)")]  # fmt: skip
    for values, message in bad:
        with pytest.raises(SystemExit):
            benchmark_tool.parse_args([base, fatr, "--device", "cpu", "--keep-ratio", *values])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"error: --keep-ratio {values[0]}: " in err and message in err
    with pytest.raises(SystemExit):
        benchmark_tool.parse_args([base, "--device", "cpu", "--keep-ratio", "0.5"])
    assert "has no token reduction" in capsys.readouterr().err
    with pytest.raises(KeepRatioError, match="none of"):
        config_variants([base, base], [0.5])
