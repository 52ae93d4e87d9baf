"""mmseg/mmengine glue: the only part of ``fatr_seg`` that imports mmseg, mmengine or mmcv.

Importing it (e.g. through ``custom_imports``) registers the backbone, the head, the CamVid
dataset and its annotation loader and the distillation segmentor, and makes mmengine checkpoints
loadable under torch >= 2.6's ``weights_only=True`` default (see :mod:`fatr_seg.models.compat`).
"""

from . import compat  # noqa: F401
from .backbone import FATRViT
from .convert import CheckpointError, convert_state_dict
from .datasets import CamVidDataset, LoadCamVidAnnotations
from .distill import DistillEncoderDecoder
from .segmenter_head import FATRSegmenterHead

__all__ = [
    "CamVidDataset",
    "CheckpointError",
    "DistillEncoderDecoder",
    "FATRSegmenterHead",
    "FATRViT",
    "LoadCamVidAnnotations",
    "convert_state_dict",
]
