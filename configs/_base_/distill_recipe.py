# The paper's self-distillation fine-tuning recipe, written once for the configs that fine-tune a
# trained model into FATR (configs/fatr_vit-s_mask_distill-8xb1-16k_ade20k-512x512.py,
# configs/camvid/fatr_vit-t_camvid_distill.py, configs/demo/fatr_vit-t_fcn_distill-1xb8-100_synthetic-192x192.py): CE +
# distillation from the unreduced model, AdamW lr 1e-4, weight decay 2e-5, no warm-up, drop-path 0,
# EMA 0.9998. See README.md, "Fine-tune a trained Segmenter into FATR", and docs/method.md,
# "Fine-tuning: self-distillation".
#
# One variable, not `model`/`optim_wrapper`/`custom_hooks`: a config lists this file next to the
# config it fine-tunes, which defines those, and mmengine refuses a key that two `_base_` files
# both define. A config takes it with `recipe = _base_.pop('distill_recipe')` (in a config's code
# `_base_` is the dict of its bases' variables, later merged into the config: popped from it, the
# recipe does not reach the resolved config, so what a run dumps holds it once, in `model`,
# `optim_wrapper`, ..., not a second time under this name) and `del recipe` once it has used it.
# What differs from config to config stays there: the teacher's checkpoint, the schedule (its
# length), the demo's lr and hooks.
distill_recipe = dict(
    # Merged into the config's `model` (the student): the distillation wrapper around it. The
    # config adds teacher_checkpoint.
    model=dict(
        type='DistillEncoderDecoder',
        init_student_from_teacher=True,
        distill_weight=1.0,
        distill_temperature=1.0,
        feat_distill_weight=0.0,
        budget_range=None,  # e.g. (0.5, 0.9): one keep ratio per iteration; evaluated at keep_ratio
        budget_seed=0,
        budget_anchors=(),  # e.g. (0.9,) with budget_range: also that ratio at every iteration
        # The weights come from the teacher's checkpoint, not from an ImageNet backbone.
        backbone=dict(drop_path_rate=0.0, init_cfg=None)),
    # No weight decay on the reduction's own parameters (omega1, omega2, dc_pos: 0 is their
    # identity) nor on the embeddings (pos_embed, cls_token). Replaces the fine-tuned config's
    # optim_wrapper as a whole (its clip_grad included).
    optim_wrapper=dict(
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
        _delete_=True),
    # EMA of the student at the paper's 0.9998: mmengine's momentum is the weight of the new
    # value, ema = (1 - momentum) * ema + momentum * student. Validation runs on the EMA weights
    # (the hook swaps them in), and each checkpoint's state_dict holds the EMA weights (the raw
    # ones are in its ema_state_dict), so tools/test.py evaluates the EMA model.
    custom_hooks=[dict(type='EMAHook', ema_type='ExponentialMovingAverage', momentum=0.0002)],
    # One cosine decay over the whole run from the first iteration, no warm-up: a config gives it
    # its length, param_scheduler = [dict(recipe.cosine_decay, T_max=max_iters, end=max_iters)].
    cosine_decay=dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=False, begin=0))
# The top-level `optimizer`, which replaces the fine-tuned config's SGD for readers of a dumped
# config (the Runner reads optim_wrapper).
distill_recipe['optimizer'] = dict(distill_recipe['optim_wrapper']['optimizer'], _delete_=True)
