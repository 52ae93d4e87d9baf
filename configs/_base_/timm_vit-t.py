# timm's ViT-Ti/16 as a TimmFATRViT backbone, for the CamVid configs that build it through timm
# (configs/timm/*vit-t_camvid*.py): one variable, which a config pops from `_base_` as it pops
# distill_recipe.py's, and completes with its input size, drop path, reduction and weights.
timm_vit_t = dict(
    type='TimmFATRViT',
    model_name='vit_tiny_patch16_224',
    # The positional embedding resampled as the FATRViT configs resample it (no antialiasing),
    # so checkpoints of either give the same features at every size.
    antialias=False,
    out_indices=-1)
