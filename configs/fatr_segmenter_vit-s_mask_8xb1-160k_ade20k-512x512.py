# mmseg's own Segmenter-Mask ViT-S/16 (ADE20K 512x512, 160k iterations, its pretrained weights by
# URL) with FATR in the backbone: the whole change is the backbone's type and its reduction.
_base_ = ['mmseg::segmenter/segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py']
custom_imports = dict(imports=['fatr_seg.models'], allow_failed_imports=False)
model = dict(backbone=dict(type='FATRViT',
                           reduction=dict(method='fatr_local', reduce_in_training=False)))
