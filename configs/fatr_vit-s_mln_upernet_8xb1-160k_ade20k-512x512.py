# FATR ViT-S/16 + MultiLevelNeck + UPerHead (4 restored maps at blocks 4, 6, 8, 12), ADE20K 512x512.
_base_ = ['./fatr_ade20k.py']
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(out_indices=(3, 5, 7, 11), compact_output=False),  # the neck reads full maps
    neck=dict(
        type='MultiLevelNeck',
        in_channels=[384, 384, 384, 384],
        out_channels=384,
        scales=[4, 2, 1, 0.5]),
    decode_head=dict(
        _delete_=True,
        type='UPerHead',
        in_channels=[384, 384, 384, 384],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
