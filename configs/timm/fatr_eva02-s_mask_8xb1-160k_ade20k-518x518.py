# FATR Segmenter-Mask on EVA-02 ViT-S/14: the model of
# segmenter_eva02-s_mask_8xb1-160k_ade20k-518x518.py with FATR's late schedule (method='fatr'; the configs' default
# fatr_local runs on timm's models too, not yet measured there). A merged token
# keeps its representative's rotary position (docs/timm.md); the mask head runs on the reduced
# token set.
_base_ = ['./segmenter_eva02-s_mask_8xb1-160k_ade20k-518x518.py']
model = dict(
    backbone=dict(reduction=dict(method='fatr', _delete_=True), compact_output=True))
