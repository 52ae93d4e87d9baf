# FATR Segmenter-Mask ViT-Ti/16 on CamVid through timm: ../camvid/fatr_vit-t_camvid.py with the
# backbone built by timm (segmenter_timm-vit-t_camvid.py) and the default reduction.
_base_ = ['./segmenter_timm-vit-t_camvid.py']
model = dict(
    backbone=dict(reduction=dict(method='fatr', _delete_=True), compact_output=True))
