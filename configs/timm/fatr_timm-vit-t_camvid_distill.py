# FATR Segmenter-Mask ViT-Ti/16 on CamVid through timm, fine-tuned with the paper's recipe
# (../camvid/fatr_vit-t_camvid_distill.py: self-distillation from the trained unreduced model,
# AdamW, EMA), the backbone built by timm. The teacher and starting point is the trained
# ../camvid/segmenter_vit-t_camvid.py (or segmenter_timm-vit-t_camvid.py): the same keys.
_base_ = ['../camvid/fatr_vit-t_camvid_distill.py', '../_base_/timm_vit-t.py']
vit = _base_.pop('timm_vit_t')
model = dict(
    backbone=dict(
        vit, _delete_=True, model_kwargs=dict(img_size=_base_.crop_size),
        drop_path_rate=0.0,  # the recipe's
        reduction=dict(method='fatr'), compact_output=True))
del vit  # used; not a key of the resolved config
