# FATR Segmenter-Mask ViT-B/16, ADE20K 512x512.
_base_ = ['./fatr_ade20k.py']
model = dict(
    backbone=dict(
        embed_dims=768,
        num_heads=12,
        init_cfg=dict(type='Pretrained', checkpoint='pretrain/vit_base_patch16_384.pth')),
    decode_head=dict(in_channels=768, channels=768, num_heads=12, embed_dims=768))
