# FATR Segmenter-Mask on DINOv2 ViT-S/14 with 4 registers: the model of
# segmenter_dinov2-s-reg4_mask_8xb1-160k_ade20k-518x518.py with the default reduction (CLS and
# the registers are never scored or merged); the mask head runs on the reduced token set.
_base_ = ['./segmenter_dinov2-s-reg4_mask_8xb1-160k_ade20k-518x518.py']
model = dict(
    backbone=dict(reduction=dict(method='fatr', _delete_=True), compact_output=True))
