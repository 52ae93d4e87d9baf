"""The CamVid study's configs and measurements (:mod:`fatr_seg.analysis.camvid_runs`).

A tiny version of the CamVid configs (4 blocks of width 32) on hand-made 360x480 CamVid files:
:func:`evaluate` gives what mmseg's ``Runner.test()`` gives on the same checkpoint, the
evaluation inputs are the images as the test pipeline pads and normalises them, and a baseline
checkpoint loads into every reduced model (only the reduction's parameters missing).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from camvid_data import REPO, write_camvid

CONFIGS = REPO / "configs" / "camvid"
TINY = """_base_ = [{base!r}]
model = dict(
    backbone=dict(embed_dims=32, num_layers=4, num_heads=2, drop_path_rate=0.0, init_cfg=None),
    decode_head=dict(in_channels=32, channels=32, num_heads=2, embed_dims=32, num_layers=1))
"""
FATR_TINY = dict(method="fatr", layers=(2, 3))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Study options over tiny configs and three hand-made val images."""
    tmp = tmp_path_factory.mktemp("camvid_runs")
    pairs = write_camvid(tmp / "camvid", {"val": 3}, size=(360, 480))["val"]
    paths = {}
    for name in ("segmenter_vit-t_camvid.py", "fatr_vit-t_camvid.py"):
        paths[name] = tmp / f"tiny_{name}"
        paths[name].write_text(TINY.format(base=str(CONFIGS / name)))
    args = SimpleNamespace(
        baseline_config=str(paths["segmenter_vit-t_camvid.py"]),
        model_config=str(paths["fatr_vit-t_camvid.py"]),
        data_root=str(tmp / "camvid"), workers=0, train_images=0, val_images=0, crop_size=64,
    )  # fmt: skip
    return args, pairs, tmp


@pytest.mark.slow
def test_evaluate_gives_runner_test_miou(tiny):
    from mmengine.runner import Runner

    from fatr_seg.analysis.camvid_runs import build_model, evaluate, model_cfg, val_dataset

    args, _, tmp = tiny
    cfg = model_cfg(args, None)
    torch.manual_seed(0)
    model = build_model(cfg, None)
    ckpt = tmp / "base.pth"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    ours = evaluate(build_model(cfg, str(ckpt)), val_dataset(cfg))
    assert ours["images"] == 3 and len(ours["IoU"]) == 11

    runner_cfg = model_cfg(args, None)
    runner_cfg.test_dataloader = runner_cfg.val_dataloader
    runner_cfg.test_cfg = dict(type="TestLoop")
    runner_cfg.test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
    runner_cfg.update(work_dir=str(tmp / "runner"), load_from=str(ckpt), launcher="none")
    metrics = Runner.from_cfg(runner_cfg).test()
    # mmseg rounds its summary to 2 decimals.
    assert ours["mIoU"] == pytest.approx(metrics["mIoU"], abs=0.005 + 1e-9)
    assert ours["aAcc"] == pytest.approx(metrics["aAcc"], abs=0.005 + 1e-9)
    ious = [v for v in ours["IoU"] if v is not None]
    assert ours["mIoU"] == pytest.approx(float(np.mean(ious)), abs=1e-9)


@pytest.mark.slow
def test_baseline_checkpoint_loads_into_reduced_models(tiny):
    from fatr_seg.analysis.camvid_runs import StudyError, build_model, model_cfg

    args, _, tmp = tiny
    torch.manual_seed(0)
    base = build_model(model_cfg(args, None), None)
    ckpt = tmp / "base_for_reduced.pth"
    torch.save({"state_dict": base.state_dict()}, ckpt)
    x = torch.randn(1, 3, 64, 96)
    for method in ("fatr", "fatr_paper", "tome", "evit"):
        red = dict(method=method, layers=(2, 3))
        if method == "fatr_paper":
            red["windows"] = (2, 1)
        model = build_model(model_cfg(args, red), str(ckpt))
        assert model.backbone.reduction.method == method
        # At keep ratio 1 nothing is removed: the baseline's features, exactly.
        model.backbone.set_keep_ratio(1.0)
        with torch.no_grad():
            got, want = model.extract_feat(x)[0], base.extract_feat(x)[0]
        got = got.restore() if hasattr(got, "restore") else got
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    wrong = tmp / "wrong.pth"
    torch.save({"state_dict": {"backbone.cls_token": torch.zeros(1, 1, 8)}}, wrong)
    with pytest.raises(StudyError, match="wrong.pth does not match the segmentor"):
        build_model(model_cfg(args, FATR_TINY), str(wrong))


@pytest.mark.slow
def test_val_inputs_are_the_padded_normalised_images(tiny):
    from fatr_seg.analysis.camvid_runs import model_cfg, val_inputs

    args, pairs, _ = tiny
    x = val_inputs(model_cfg(args, None), 4)  # 3 images: the fourth repeats the first
    assert x.shape == (4, 3, 368, 480)
    for i, stem in enumerate(sorted(pairs) + [sorted(pairs)[0]]):
        rgb = torch.from_numpy(pairs[stem][0]).permute(2, 0, 1).float()
        torch.testing.assert_close(x[i, :, :360], (rgb - 127.5) / 127.5, rtol=0, atol=1e-6)
        assert torch.equal(x[i, :, 360:], torch.zeros(3, 8, 480))
