"""mmseg/mmengine glue: the only part of ``fatr_seg`` that imports mmseg, mmengine or mmcv.

Importing it (e.g. through ``custom_imports``) registers ``FATRViT``, ``FATRSegmenterHead``,
``TimmFATRViT``, ``BatchedSlideEncoderDecoder``, ``DistillEncoderDecoder``, ``CamVidDataset``,
``LoadCamVidAnnotations``, ``AllowMMEngineCheckpointsHook``, ``UnreducedCheckpointHook``,
``CompileInferenceHook`` and ``CUDAGraphInferenceHook`` in mmseg's registries and changes nothing
else: what touches process-wide state (torch's ``weights_only`` allow-list, the CPU process
group) is done by a call, :func:`allow_mmengine_checkpoints` and :func:`setup_cpu_distributed`
(both made by :func:`fatr_seg.models.runner.build_runner`, which ``tools/train.py`` and
``tools/test.py`` use), or by the hook a config lists.
"""

from .backbone import FATRViT
from .compile import CompileInferenceHook, add_compile_hook, compile_modules
from .convert import CheckpointError, convert_state_dict
from .cuda_graph import CUDAGraphInferenceHook
from .datasets import CamVidDataset, LoadCamVidAnnotations
from .dist import setup_cpu_distributed
from .distill import DistillEncoderDecoder
from .hooks import UnreducedCheckpointHook
from .safe_globals import AllowMMEngineCheckpointsHook, allow_mmengine_checkpoints
from .segmenter_head import FATRSegmenterHead
from .segmentor import BatchedSlideEncoderDecoder
from .timm_backbone import TimmFATRViT

__all__ = [
    "AllowMMEngineCheckpointsHook",
    "BatchedSlideEncoderDecoder",
    "CamVidDataset",
    "CheckpointError",
    "CUDAGraphInferenceHook",
    "CompileInferenceHook",
    "DistillEncoderDecoder",
    "FATRSegmenterHead",
    "FATRViT",
    "LoadCamVidAnnotations",
    "TimmFATRViT",
    "UnreducedCheckpointHook",
    "add_compile_hook",
    "allow_mmengine_checkpoints",
    "compile_modules",
    "convert_state_dict",
    "setup_cpu_distributed",
]
