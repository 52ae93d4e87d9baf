# FATR Segmenter-Mask ViT-S/16, ADE20K 512x512 (1024 patch tokens), the default reduction
# (method='fatr_local': 2x2 windows folded at block 2, global merging at 5 and 8; trained unreduced).
_base_ = ['./_base_/fatr_segmenter_vit-s.py']
