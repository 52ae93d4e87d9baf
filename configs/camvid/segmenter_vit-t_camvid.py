# Segmenter-Mask ViT-Ti/16 without reduction on CamVid (SegNet's 11 classes, 480x360), from timm's
# ImageNet ViT-Ti/16 weights. Data: docs/usage.md, section 'CamVid'; weights: 'Pretrained weights'.
_base_ = ['../_base_/fatr_segmenter_vit-s.py']

data_root = 'data/camvid'
crop_size = (352, 352)  # 22x22 = 484 tokens; 352 is the largest multiple of 16 below 360
# timm's vit_tiny_patch16_224.augreg_in21k_ft_in1k as the hub stores it (read as is; its 14x14
# positional embedding is resized to the crop's 22x22 grid at load).
pretrained = 'pretrain/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors'

# The base's training pipeline with CamVid's labels: scale jitter around the native 480x360
# (x0.5..x2), crops, flips, colour jitter.
train_pipeline = [dict(t) for t in _base_.train_pipeline]  # copies: the base's stay as they are
train_pipeline[1] = dict(type='LoadCamVidAnnotations')  # void (11) -> 255, ignored in loss and mIoU
train_pipeline[2].update(scale=(480, 360))  # RandomResize
train_pipeline[3].update(crop_size=crop_size)  # RandomCrop
# Evaluation on the whole native image (no resize).
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadCamVidAnnotations'),
    dict(type='PackSegInputs'),
]

# The fields every split shares; each loader below adds its folders and pipeline.
camvid_dataset = dict(type='CamVidDataset', data_root=data_root, _delete_=True)
train_dataloader = dict(
    batch_size=8,
    dataset=dict(camvid_dataset, pipeline=train_pipeline,
                 data_prefix=dict(img_path='images/train', seg_map_path='labels/train')))
val_dataloader = dict(
    batch_size=1,
    dataset=dict(camvid_dataset, pipeline=test_pipeline,
                 data_prefix=dict(img_path='images/val', seg_map_path='labels/val')))
# CamVid's published numbers are on its test split (233 images).
test_dataloader = dict(
    batch_size=1,
    dataset=dict(camvid_dataset, pipeline=test_pipeline,
                 data_prefix=dict(img_path='images/test', seg_map_path='labels/test')))

model = dict(
    # Test images are padded to 368x480 (23x30 = 690 tokens); the logits are cropped back to
    # 360x480, so each output pixel stays aligned with its patch.
    data_preprocessor=dict(size=crop_size, test_cfg=dict(size_divisor=16)),
    backbone=dict(
        img_size=crop_size,
        embed_dims=192,
        num_heads=3,
        reduction=None,
        compact_output=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    # mmseg's Segmenter-T mask head.
    decode_head=dict(
        in_channels=192, channels=192, num_layers=2, num_heads=3, embed_dims=192,
        num_classes=11,
        # Mean over labelled pixels only: void and the crops' padding (255) can be most of a
        # crop scaled down to x0.5, and would otherwise shrink its loss.
        loss_decode=dict(avg_non_ignore=True)),
    test_cfg=dict(mode='whole', _delete_=True))

# Segmenter's published recipe for street scenes (its Cityscapes setting, segm/config.yml): SGD,
# momentum 0.9, no weight decay, lr 0.01 with poly decay, batch 8, 216 epochs. SGD as Segmenter
# because that is the recipe published for fine-tuning these ImageNet ViTs with this head, and
# CamVid's scenes are Cityscapes-like; 216 epochs of the 367 training images at batch 8 are 10k
# iterations. Not tuned on CamVid. On N devices, set train_dataloader.batch_size=8/N.
max_iters = 10000
optimizer = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0)
optim_wrapper = dict(type='OptimWrapper', optimizer=optimizer, clip_grad=None, _delete_=True)
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-5, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=1000)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=1000, max_keep_ckpts=2,
        save_best='mIoU'))
auto_scale_lr = dict(enable=False, base_batch_size=8)
