# The same Segmenter-Mask ViT-S/16 without reduction: identical weights, the same fused attention.
_base_ = ['./fatr_ade20k.py']
model = dict(backbone=dict(reduction=None))
