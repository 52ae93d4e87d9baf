# Segmenter-Mask on a timm ViT with patch size 14 (TimmFATRViT), ADE20K at 518x518 crops (37x37 =
# 1369 patch tokens), mmseg's Segmenter schedule: configs/timm/*_ade20k-518x518.py set the model
# (model_name, weights, normalisation) and the reduction. See docs/timm.md.
_base_ = ['./fatr_segmenter_vit-s.py']
crop_size = (518, 518)  # 37 patches of 14 pixels: no padding inside a crop
# The base's pipelines at this crop: a short side of 518 (x0.5..x2 in training), crops of 518.
train_pipeline = [dict(t) for t in _base_.train_pipeline]  # copies: the base's stay as they are
train_pipeline[2].update(scale=(2072, 518))  # RandomResize
train_pipeline[3].update(crop_size=crop_size)  # RandomCrop
test_pipeline = [dict(t) for t in _base_.test_pipeline]
test_pipeline[1].update(scale=(2072, 518))  # Resize
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='TimmFATRViT',
        # model_name, init_cfg: in the config
        model_kwargs=dict(img_size=crop_size),  # the positional embedding is resampled to 37x37
        drop_path_rate=0.1,
        out_indices=-1,
        reduction=None,
        compact_output=False),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(480, 480)))
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
