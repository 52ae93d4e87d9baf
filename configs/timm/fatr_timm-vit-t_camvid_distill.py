# FATR Segmenter-Mask ViT-Ti/16 on CamVid through timm, fine-tuned with the paper's recipe
# (../camvid/fatr_vit-t_camvid_distill.py: self-distillation from the trained unreduced model,
# AdamW, EMA), the backbone built by timm. The teacher and starting point is the trained
# ../camvid/segmenter_vit-t_camvid.py (or segmenter_timm-vit-t_camvid.py): the same keys.
_base_ = ['../camvid/fatr_vit-t_camvid_distill.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='TimmFATRViT',
        model_name='vit_tiny_patch16_224',
        model_kwargs=dict(img_size={{_base_.crop_size}}),
        # The positional embedding resampled as the FATRViT configs resample it (no
        # antialiasing), so checkpoints of either give the same features at every size.
        antialias=False,
        drop_path_rate=0.0,  # the recipe's
        out_indices=-1,
        reduction=dict(method='fatr'),
        compact_output=True))
