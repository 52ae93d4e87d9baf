# FATR Segmenter-Mask ViT-S/16, ADE20K 512x512 (1024 patch tokens), reduction at 4/7/10, keep 0.7.
_base_ = ['./_base_/fatr_segmenter_vit-s.py']
