# Embedded default (`make demo`), its fine-tuning step: FATR ViT-T/16 (configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py)
# fine-tuned by self-distillation from the trained baseline (configs/demo/segmenter_vit-t_fcn_1xb8-200_synthetic-192x192.py),
# which is also its starting point: the recipe of configs/fatr_vit-s_mask_distill-8xb1-16k_ade20k-512x512.py (CE + KL to the
# unreduced model, AdamW, weight decay 2e-5, no warm-up, drop-path 0, cosine decay) at the demo's
# scale. See README.md, "Fine-tune a trained Segmenter into FATR".
_base_ = ['./fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py', '../_base_/distill_recipe.py']
# The recipe's distillation wrapper around the student and AdamW without weight decay on FATR's
# own parameters and the embeddings: configs/_base_/distill_recipe.py. In the config's code
# mmengine binds `_base_` to the bases' variables (a dict, not the list above); popped from it, the
# recipe is not copied into the resolved config, and `del recipe` at the end drops this name too.
recipe = _base_.pop('distill_recipe')

# Where `make demo` writes the baseline's last checkpoint; tools/demo.py passes it anyway with
# --cfg-options model.teacher_checkpoint=PATH.
teacher_checkpoint = 'work_dirs/demo/baseline/iter_200.pth'
# The recipe's drop-path 0 and init_cfg=None are the demo model's own already.
model = dict(teacher_checkpoint=teacher_checkpoint, **recipe.model)

# lr 3e-4 instead of the recipe's 1e-4 (made for 16k iterations): over these 100 iterations,
# 1e-4 / 3e-4 / 1e-3 gave 59.2 / 60.2 / 52.6 mIoU against 58.9 training-free and 60.3 for the
# baseline, all trained with 2 threads (docs/history/benchmarks-2026-11.md, "Demo").
optim_wrapper = recipe.optim_wrapper
optim_wrapper.optimizer.lr = 3e-4
# The recipe's EMA (0.9998) averages over about 5000 iterations: over this short run it would
# stay at the starting weights, so the demo evaluates the trained weights themselves.
custom_hooks = [dict(type='AllowMMEngineCheckpointsHook')]

# Half the baseline's 200 iterations, batch 8 as the baseline; cosine decay from the first
# iteration. Each iteration also runs the teacher's forward; docs/history/benchmarks-2026-11.md, "Demo".
max_iters = 100
param_scheduler = [dict(recipe.cosine_decay, T_max=max_iters, end=max_iters)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1))
del recipe  # used; not a key of the resolved config
