# Segmenter-Mask on DINOv2 ViT-S/14 with 4 registers (timm's vit_small_patch14_reg4_dinov2), no
# reduction, ADE20K 518x518. The weights are DINOv2's as timm stores them (the hub's
# timm/vit_small_patch14_reg4_dinov2.lvd142m model.safetensors; DINOv2's own .pth is converted by
# timm's filter too), read from this path, never downloaded: see docs/timm.md.
_base_ = ['../_base_/segmenter_timm_ade20k-518x518.py']
pretrained = 'pretrain/vit_small_patch14_reg4_dinov2.lvd142m.safetensors'
model = dict(
    # DINOv2's normalisation: ImageNet mean and std.
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]),
    backbone=dict(
        model_name='vit_small_patch14_reg4_dinov2',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
