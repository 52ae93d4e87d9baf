# FATR ViT-S/16 at 384x384 crops (576 patch tokens).
_base_ = ['./fatr_ade20k.py']
crop_size = (384, 384)
data_preprocessor = dict(size=crop_size)
# The base's pipelines at this crop: a short side of 384 (x0.5..x2 in training), crops of 384.
train_pipeline = [dict(t) for t in _base_.train_pipeline]  # copies: the base's stay as they are
train_pipeline[2].update(scale=(1536, 384))  # RandomResize
train_pipeline[3].update(crop_size=crop_size)  # RandomCrop
test_pipeline = [dict(t) for t in _base_.test_pipeline]
test_pipeline[1].update(scale=(1536, 384))  # Resize
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(img_size=crop_size),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(320, 320)))
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
