# FATR Segmenter-Mask ViT-Ti/16 on CamVid, fine-tuned by self-distillation from the trained
# unreduced model (configs/camvid/segmenter_vit-t_camvid.py), which is also its starting point.
# The paper's fine-tuning recipe: CE + distillation from the unreduced model, AdamW lr 1e-4,
# weight decay 2e-5, no warm-up, drop-path 0, EMA 0.9998. See README.md, "Fine-tune a trained
# Segmenter into FATR", and docs/method.md, "Fine-tuning: self-distillation".
_base_ = ['./fatr_vit-t_camvid.py']

# The baseline's last checkpoint; override with --cfg-options model.teacher_checkpoint=PATH.
teacher_checkpoint = 'work_dirs/segmenter_vit-t_camvid/iter_10000.pth'
model = dict(
    type='DistillEncoderDecoder',
    teacher_checkpoint=teacher_checkpoint,
    init_student_from_teacher=True,
    distill_weight=1.0,
    distill_temperature=1.0,
    feat_distill_weight=0.0,
    budget_range=None,  # e.g. (0.5, 0.9): one keep ratio per iteration; evaluated at keep_ratio
    budget_seed=0,
    # The weights come from the teacher's checkpoint, not from an ImageNet backbone.
    backbone=dict(drop_path_rate=0.0, init_cfg=None))

# No weight decay on the reduction's own parameters (omega1, omega2, dc_pos: 0 is their identity)
# nor on the embeddings (pos_embed, cls_token). (The top-level `optimizer` replaces the base's
# SGD for readers of the dumped config; the Runner reads optim_wrapper.)
optimizer = dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=2e-5, _delete_=True)
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=2e-5),
    clip_grad=None,
    paramwise_cfg=dict(custom_keys={
        'omega1': dict(decay_mult=0.0),
        'omega2': dict(decay_mult=0.0),
        'dc_pos': dict(decay_mult=0.0),
        'pos_embed': dict(decay_mult=0.0),
        'cls_token': dict(decay_mult=0.0),
    }),
    _delete_=True)

# EMA of the student at the paper's 0.9998: mmengine's momentum is the weight of the new value,
# ema = (1 - momentum) * ema + momentum * student. Validation runs on the EMA weights (the hook
# swaps them in), and each checkpoint's state_dict holds the EMA weights (the raw ones are in its
# ema_state_dict), so tools/test.py evaluates the EMA model.
custom_hooks = [dict(type='EMAHook', ema_type='ExponentialMovingAverage', momentum=0.0002)]

# A fifth of the baseline's 10k iterations at its batch of 8. Cosine decay from the first
# iteration: no warm-up.
max_iters = 2000
param_scheduler = [
    dict(type='CosineAnnealingLR', T_max=max_iters, eta_min=1e-6, by_epoch=False, begin=0,
         end=max_iters)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=500)
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=500))
