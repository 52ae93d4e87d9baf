# FATR Segmenter-Mask ViT-T/16, ADE20K 512x512.
_base_ = ['./fatr_ade20k.py']
model = dict(
    backbone=dict(
        embed_dims=192,
        num_heads=3,
        init_cfg=dict(type='Pretrained', checkpoint='pretrain/vit_tiny_patch16_384.pth')),
    decode_head=dict(in_channels=192, channels=192, num_heads=3, embed_dims=192))
