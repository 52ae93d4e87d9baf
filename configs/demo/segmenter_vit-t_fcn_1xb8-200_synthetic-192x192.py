# Embedded default, baseline: configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py without token reduction (plain ViT-T/16).
_base_ = ['./fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py']
model = dict(backbone=dict(reduction=None))
