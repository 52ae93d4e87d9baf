# FATR's fast schedule (method='fatr_local': an early local stage at block 2, then global merging
# at blocks 5 and 8) on the CamVid Segmenter-Mask ViT-Ti/16 of fatr_vit-t_camvid.py.
_base_ = ['./fatr_vit-t_camvid.py']
model = dict(backbone=dict(reduction=dict(method='fatr_local', _delete_=True)))
