"""mmseg/mmengine glue: the only part of ``fatr_seg`` that imports mmseg, mmengine or mmcv.

Importing it (e.g. through ``custom_imports``) registers the backbone, the head, the segmentor
with batched slide inference, the compile hook, the CamVid dataset and its annotation loader,
and makes mmengine checkpoints loadable under torch >= 2.6's ``weights_only=True`` default (see
:mod:`fatr_seg.models.compat`).
"""

from . import compat  # noqa: F401
from .backbone import FATRViT
from .compile import CompileInferenceHook, add_compile_hook, compile_modules
from .convert import CheckpointError, convert_state_dict
from .datasets import CamVidDataset, LoadCamVidAnnotations
from .segmenter_head import FATRSegmenterHead
from .segmentor import BatchedSlideEncoderDecoder

__all__ = [
    "BatchedSlideEncoderDecoder",
    "CamVidDataset",
    "CheckpointError",
    "CompileInferenceHook",
    "FATRSegmenterHead",
    "FATRViT",
    "LoadCamVidAnnotations",
    "add_compile_hook",
    "compile_modules",
    "convert_state_dict",
]
