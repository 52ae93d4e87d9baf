# FATR Segmenter-Mask ViT-Ti/16 on CamVid: the unreduced model of segmenter_vit-t_camvid.py with
# the default reduction (as configs/fatr_ade20k.py); the mask head runs on the reduced token set.
_base_ = ['./segmenter_vit-t_camvid.py']
model = dict(
    backbone=dict(
        # _delete_: the base's reduction is None, which a dict cannot update.
        reduction=dict(method='fatr_local', reduce_in_training=False, _delete_=True),
        compact_output=True))
