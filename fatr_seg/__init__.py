"""fatr_seg: Frequency-Aware Token Reduction for plain-ViT semantic segmentation (mmseg 1.x).

Layout (dependencies point one way):
    fatr_seg.ops      pure torch functions: scoring, selection, DC aggregation, restoration
    fatr_seg.layers   torch modules built on ops (no mmseg/mmengine/mmcv)
    fatr_seg.models   the mmseg glue: registered backbone, checkpoint conversion
    fatr_seg.datasets synthetic ADE20K-layout data for the embedded default
"""

__version__ = "0.1.0"
