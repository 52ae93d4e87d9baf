# Segmenter-Mask on EVA-02 ViT-S/14 (timm's eva02_small_patch14_224: rotary embeddings, SwiGLU),
# no reduction, ADE20K 518x518. The weights are EVA-02's as timm stores them (e.g. the hub's
# timm/eva02_small_patch14_224.mim_in22k model.safetensors), read from this path, never
# downloaded: see docs/timm.md.
_base_ = ['../_base_/segmenter_timm_ade20k-518x518.py']
pretrained = 'pretrain/eva02_small_patch14_224.mim_in22k.safetensors'
model = dict(
    # EVA-02's normalisation: CLIP's mean and std.
    data_preprocessor=dict(mean=[122.771, 116.746, 104.094], std=[68.501, 66.632, 70.323]),
    backbone=dict(
        model_name='eva02_small_patch14_224',
        # EVA-02 pools by averaging: timm's `norm` is an Identity and the trained final norm is
        # the classifier's fc_norm, applied here to every token.
        final_norm='fc_norm',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
