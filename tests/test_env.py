"""The installed environment: compiled mmcv ops, and mmseg 1.2.2's data pipeline on numpy 2.x and
opencv 5.x (the versions requirements/ pins; mmseg 1.2.2 predates both)."""

import cv2
import mmcv
import mmcv.ops
import mmseg.datasets  # noqa: F401  (registers the transforms)
import mmseg.models  # noqa: F401  (imports mmcv.ops at import time)
import numpy as np
import timm  # noqa: F401
import torch
from mmcv.transforms import Compose
from mmengine.registry import init_default_scope

import fatr_seg  # noqa: F401


def test_mmcv_compiled_ops_run():
    assert mmcv.__version__ == "2.1.0"
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    _, keep = mmcv.ops.nms(boxes, scores, iou_threshold=0.5)  # runs mmcv's compiled _ext
    assert keep.tolist() == [0, 2]


def _load(pipeline, img_path, seg_path, reduce_zero_label):
    """One sample through ``pipeline``, as mmseg's dataset hands it over."""
    return pipeline(dict(img_path=str(img_path), seg_map_path=str(seg_path),
                         reduce_zero_label=reduce_zero_label, seg_fields=[]))  # fmt: skip


def test_ade20k_train_pipeline(tmp_path):
    init_default_scope("mmseg")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    seg = rng.integers(0, 151, (300, 400), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "img.jpg"), img)
    cv2.imwrite(str(tmp_path / "seg.png"), seg)
    # mmseg's configs/_base_/datasets/ade20k.py train pipeline, with a smaller crop;
    # reduce_zero_label comes with the sample, as ADE20KDataset passes it.
    pipeline = Compose(
        [
            dict(type="LoadImageFromFile"),
            dict(type="LoadAnnotations"),
            dict(type="RandomResize", scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
            dict(type="RandomCrop", crop_size=(256, 256), cat_max_ratio=0.75),
            dict(type="RandomFlip", prob=0.5),
            dict(type="PhotoMetricDistortion"),
            dict(type="PackSegInputs"),
        ]
    )
    for _ in range(5):
        out = _load(pipeline, tmp_path / "img.jpg", tmp_path / "seg.png", reduce_zero_label=True)
        assert out["inputs"].shape == (3, 256, 256) and out["inputs"].dtype == torch.uint8
        labels = out["data_samples"].gt_sem_seg.data
        assert labels.shape == (1, 256, 256)
        # reduce_zero_label maps 0 to 255 and 1..150 to 0..149.
        assert set(labels.unique().tolist()) <= set(range(150)) | {255}


def test_png_labels_round_trip_exactly(tmp_path):
    init_default_scope("mmseg")
    seg = np.random.default_rng(1).integers(0, 151, (64, 80), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "seg.png"), seg)
    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((64, 80, 3), np.uint8))
    for backend in ("cv2", "pillow"):
        pipeline = Compose(
            [
                dict(type="LoadImageFromFile", imdecode_backend=backend),
                dict(type="LoadAnnotations", imdecode_backend=backend),
                dict(type="PackSegInputs"),
            ]
        )
        out = _load(pipeline, tmp_path / "img.png", tmp_path / "seg.png", reduce_zero_label=False)
        np.testing.assert_array_equal(out["data_samples"].gt_sem_seg.data[0].numpy(), seg)
