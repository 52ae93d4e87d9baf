"""mmseg/mmengine glue: the only part of ``fatr_seg`` that imports mmseg, mmengine or mmcv.

Importing it (e.g. through ``custom_imports``) also makes mmengine checkpoints loadable under
torch >= 2.6's ``weights_only=True`` default (see :mod:`fatr_seg.models.compat`).
"""

from . import compat  # noqa: F401
from .backbone import FATRViT
from .convert import CheckpointError, convert_state_dict
from .distill import DistillEncoderDecoder
from .segmenter_head import FATRSegmenterHead

__all__ = [
    "CheckpointError",
    "DistillEncoderDecoder",
    "FATRSegmenterHead",
    "FATRViT",
    "convert_state_dict",
]
