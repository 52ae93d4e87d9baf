"""fatr_seg: Frequency-Aware Token Reduction for plain-ViT semantic segmentation (mmseg 1.x).

Layout (dependencies point one way):
    fatr_seg.ops      pure torch functions: scoring, selection, aggregation, restoration
    fatr_seg.layers   torch modules built on ops (no mmseg/mmengine/mmcv)
    fatr_seg.models   the mmseg glue: backbone, head, datasets, distillation, the tools' Runner
    fatr_seg.datasets synthetic ADE20K-layout data for the embedded default, CamVid's layout
    fatr_seg.analysis the logic of the tools: FLOPs, benchmarks, demo, studies
"""

import os.path as _osp

__version__ = "0.1.0"
#: The checkout (``make install`` installs it editable): where ``tools/`` and ``configs/`` are.
REPO_ROOT = _osp.dirname(_osp.dirname(_osp.abspath(__file__)))
