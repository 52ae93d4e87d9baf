# FATR's fast schedule on the main model (configs/fatr_ade20k.py): an early local stage at block 2
# (whole 2x2 windows of low-HF tokens folded, a fixed count per image), then global merging at
# blocks 5 and 8 (method='fatr_local'; docs/method.md, "The early local stage").
_base_ = ['./fatr_ade20k.py']
model = dict(backbone=dict(reduction=dict(method='fatr_local', _delete_=True)))
