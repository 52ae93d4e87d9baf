# Segmenter-Mask ViT-Ti/16 without reduction on CamVid, as ../camvid/segmenter_vit-t_camvid.py but
# with the backbone built by timm (vit_tiny_patch16_224 through TimmFATRViT) from the same
# .safetensors: the same model, with the same state-dict keys, so checkpoints of either load
# into the other.
_base_ = ['../camvid/segmenter_vit-t_camvid.py', '../_base_/timm_vit-t.py']
vit = _base_.pop('timm_vit_t')
model = dict(
    backbone=dict(
        vit, _delete_=True, model_kwargs=dict(img_size=_base_.crop_size), drop_path_rate=0.1,
        reduction=None, compact_output=False,
        init_cfg=dict(type='Pretrained', checkpoint=_base_.pretrained)))
del vit  # used; not a key of the resolved config
