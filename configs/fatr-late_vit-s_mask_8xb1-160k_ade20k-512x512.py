# FATR's late schedule on the main model (configs/fatr_ade20k.py): global merging at blocks 4, 7
# and 10, keep 0.7 each, trained with the reduction in the loop (method='fatr'; 1.5x).
_base_ = ['./fatr_ade20k.py']
model = dict(backbone=dict(reduction=dict(method='fatr', _delete_=True)))
