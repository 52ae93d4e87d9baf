# Embedded default, baseline: configs/fatr_ade20k_demo.py without token reduction (plain ViT-T/16).
_base_ = ['./fatr_ade20k_demo.py']
model = dict(backbone=dict(reduction=None))
