# Segmenter-Mask ViT-S/16 with FATRViT, on mmseg's own ADE20K dataset, runtime and schedule.
_base_ = [
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['fatr_seg.models'], allow_failed_imports=False)
# Lets torch >= 2.6 load this Runner's checkpoints (resume, load_from) with any tool, mmseg's own
# included; see docs/usage.md, "Resume on torch >= 2.6". Our tools install the same allow-list anyway.
custom_hooks = [dict(type='AllowMMEngineCheckpointsHook')]

crop_size = (512, 512)
# mmseg's ADE20K pipelines, written here so that a config at another crop adapts them (as plain
# dicts: see fatr_vit-s_mask_8xb1-160k_ade20k-384x384.py): scale jitter around a short side of
# 512 (x0.5..x2), crops, flips, colour jitter; evaluation at a short side of 512.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
# timm ViT-S/16 (augreg, 384) converted with tools/convert_weights.py: see docs/usage.md, "Pretrained weights".
pretrained = 'pretrain/vit_small_patch16_384.pth'
# ViT-S/16's width and heads, which the mask head shares (deleted at the end: not config keys).
embed_dims, num_heads = 384, 6
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[127.5, 127.5, 127.5],
    std=[127.5, 127.5, 127.5],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
model = dict(
    # mmseg's EncoderDecoder; slide inference runs all crops of a batch as one batch (same
    # logits as mmseg's one-crop-at-a-time loop). test_cfg.crops_per_batch caps a forward.
    type='BatchedSlideEncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='FATRViT',
        img_size=crop_size,
        patch_size=16,
        in_channels=3,
        embed_dims=embed_dims,
        num_layers=12,
        num_heads=num_heads,
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.1,
        # timm's ViT, whose weights these configs load (FATRViT's defaults are mmseg's: no patch
        # bias, LayerNorm eps 1e-5, no final norm).
        norm_cfg=dict(type='LN', eps=1e-6),
        patch_bias=True,
        final_norm=True,
        out_indices=-1,
        # The method's preset (fatr_seg.layers.PRESETS; the table in docs/method.md is rendered
        # from it) fills every key left out here. Another method= gives its own preset (e.g.
        # 'fatr_paper', 'tome', 'algm'); windows=... alone switches to the paper's DC aggregation.
        # The default: the early local stage (block 2 folds whole 2x2 windows of low-HF tokens),
        # then global merging at blocks 5 and 8; training runs unreduced (reduce_in_training:
        # fine-tuned with the early stage in the loop, the model lost mIoU; docs/study.md). A
        # config that inherits this one and names another reduction adds _delete_=True, or
        # mmengine merges the two dicts key by key.
        reduction=dict(method='fatr_local', reduce_in_training=False),
        # The Segmenter head below runs on the reduced token set (exactly the logits of the
        # stock head on the restored grid). Set False to feed full-grid maps to any mmseg head.
        compact_output=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(
        # mmseg's SegmenterMaskTransformerHead (same parameters and checkpoints) on fused
        # attention; it also reads the backbone's compact output.
        type='FATRSegmenterHead',
        in_channels=embed_dims,
        channels=embed_dims,
        num_classes=150,
        num_layers=2,
        num_heads=num_heads,
        embed_dims=embed_dims,
        dropout_ratio=0.0,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(480, 480)))

# mmseg's Segmenter schedule: SGD lr 1e-3, poly, 160k iterations, 8 images per iteration in total
# (8 GPUs x 1; set train_dataloader.batch_size to 8 on one device).
optimizer = dict(type='SGD', lr=0.001, momentum=0.9, weight_decay=0.0)
optim_wrapper = dict(type='OptimWrapper', optimizer=optimizer, clip_grad=None)
train_dataloader = dict(batch_size=1)
val_dataloader = dict(batch_size=1)
auto_scale_lr = dict(enable=False, base_batch_size=8)
del embed_dims, num_heads  # used; not keys of the resolved config
