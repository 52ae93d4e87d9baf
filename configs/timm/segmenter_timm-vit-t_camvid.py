# Segmenter-Mask ViT-Ti/16 without reduction on CamVid, as ../camvid/segmenter_vit-t_camvid.py but
# with the backbone built by timm (vit_tiny_patch16_224 through TimmFATRViT) from the same
# .safetensors: the same model, with the same state-dict keys, so checkpoints of either load
# into the other.
_base_ = ['../camvid/segmenter_vit-t_camvid.py']
model = dict(
    backbone=dict(
        _delete_=True,
        type='TimmFATRViT',
        model_name='vit_tiny_patch16_224',
        model_kwargs=dict(img_size={{_base_.crop_size}}),
        # The positional embedding resampled as the FATRViT configs resample it (no
        # antialiasing), so checkpoints of either give the same features at every size.
        antialias=False,
        drop_path_rate=0.1,
        out_indices=-1,
        reduction=None,
        compact_output=False,
        init_cfg=dict(type='Pretrained', checkpoint={{_base_.pretrained}})))
