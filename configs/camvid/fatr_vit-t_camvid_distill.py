# FATR Segmenter-Mask ViT-Ti/16 on CamVid, fine-tuned by self-distillation from the trained
# unreduced model (configs/camvid/segmenter_vit-t_camvid.py), which is also its starting point.
# The paper's fine-tuning recipe: CE + distillation from the unreduced model, AdamW lr 1e-4,
# weight decay 2e-5, no warm-up, drop-path 0, EMA 0.9998. See README.md, "Fine-tune a trained
# Segmenter into FATR", and docs/method.md, "Fine-tuning: self-distillation".
_base_ = ['./fatr_vit-t_camvid.py', '../_base_/distill_recipe.py']
# The recipe's distillation wrapper around the student, AdamW without weight decay on FATR's own
# parameters and the embeddings, and EMA: configs/_base_/distill_recipe.py. In the config's code
# mmengine binds `_base_` to the bases' variables (a dict, not the list above); popped from it, the
# recipe is not copied into the resolved config, and `del recipe` at the end drops this name too.
recipe = _base_.pop('distill_recipe')

# The baseline's last checkpoint; override with --cfg-options model.teacher_checkpoint=PATH.
teacher_checkpoint = 'work_dirs/segmenter_vit-t_camvid/iter_10000.pth'
model = dict(teacher_checkpoint=teacher_checkpoint, **recipe.model)
optimizer = recipe.optimizer  # replaces the base's SGD for readers of the dumped config
optim_wrapper = recipe.optim_wrapper
custom_hooks = recipe.custom_hooks  # the EMAHook; replaces the base's list

# A fifth of the baseline's 10k iterations at its batch of 8. Cosine decay from the first
# iteration: no warm-up.
max_iters = 2000
param_scheduler = [dict(recipe.cosine_decay, T_max=max_iters, end=max_iters)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=500)
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=500))
del recipe  # used; not a key of the resolved config
