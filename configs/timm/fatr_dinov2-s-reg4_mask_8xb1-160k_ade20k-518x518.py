# FATR Segmenter-Mask on DINOv2 ViT-S/14 with 4 registers: the model of
# segmenter_dinov2-s-reg4_mask_8xb1-160k_ade20k-518x518.py with FATR's late schedule (method='fatr'; the configs' default
# fatr_local runs on timm's models too, not yet measured there) (CLS and
# the registers are never scored or merged); the mask head runs on the reduced token set.
_base_ = ['./segmenter_dinov2-s-reg4_mask_8xb1-160k_ade20k-518x518.py']
model = dict(
    backbone=dict(reduction=dict(method='fatr', _delete_=True), compact_output=True))
