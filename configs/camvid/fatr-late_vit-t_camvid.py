# FATR's late schedule (method='fatr': global merging at blocks 4, 7 and 10, keep 0.7 each,
# trained with the reduction in the loop) on the CamVid Segmenter-Mask ViT-Ti/16 of
# fatr_vit-t_camvid.py: 1.5x, the MACs reference of tools/camvid_study.py (ToMe can match it).
_base_ = ['./fatr_vit-t_camvid.py']
model = dict(backbone=dict(reduction=dict(method='fatr', _delete_=True)))
