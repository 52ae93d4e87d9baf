# FATR Segmenter-Mask ViT-S/16 on ADE20K 512x512, fine-tuned by self-distillation from mmseg's
# trained Segmenter (segmenter_vit-s_mask_8xb1-160k_ade20k-512x512, model zoo), which is also its
# starting point. The paper's fine-tuning recipe: CE + distillation from the unreduced model,
# AdamW lr 1e-4, weight decay 2e-5, no warm-up, drop-path 0, EMA 0.9998. See README.md,
# "Fine-tune a trained Segmenter into FATR", and docs/method.md, "Fine-tuning: self-distillation".
_base_ = ['./fatr_ade20k.py', './_base_/distill_recipe.py']
# The recipe's distillation wrapper around the student, AdamW without weight decay on FATR's own
# parameters and the embeddings, and EMA: configs/_base_/distill_recipe.py. In the config's code
# mmengine binds `_base_` to the bases' variables (a dict, not the list above); popped from it, the
# recipe is not copied into the resolved config, and `del recipe` at the end drops this name too.
recipe = _base_.pop('distill_recipe')

# Download it from mmseg's model zoo page for Segmenter (mmseg's key names are converted).
teacher_checkpoint = 'pretrain/segmenter_vit-s_mask_8x1_512x512_160k_ade20k_20220105_151706-511bb103.pth'  # noqa
model = dict(teacher_checkpoint=teacher_checkpoint, **recipe.model)
optimizer = recipe.optimizer  # replaces the base's SGD for readers of the dumped config
optim_wrapper = recipe.optim_wrapper
custom_hooks = recipe.custom_hooks  # the EMAHook; replaces the base's list

# A tenth of the teacher's 160k iterations (the paper fine-tunes 30 epochs after 300), 8 images
# per iteration in total as the teacher (8 processes x 1; on one device set
# train_dataloader.batch_size=8). Cosine decay from the first iteration: no warm-up.
max_iters = 16000
param_scheduler = [dict(recipe.cosine_decay, T_max=max_iters, end=max_iters)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=2000)
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=2000))
del recipe  # used; not a key of the resolved config
