# FATR Segmenter-Mask ViT-Ti/16 on CamVid through timm: ../camvid/fatr-late_vit-t_camvid.py with
# the backbone built by timm (segmenter_timm-vit-t_camvid.py); the late schedule, as measured
# (reduction=dict(method='fatr_local', reduce_in_training=False, _delete_=True) for the default).
_base_ = ['./segmenter_timm-vit-t_camvid.py']
model = dict(
    backbone=dict(reduction=dict(method='fatr', _delete_=True), compact_output=True))
