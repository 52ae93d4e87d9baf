"""A random batch in the form mmseg's data loader gives a segmentor (for training steps)."""

import torch
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample


def seg_batch(size: tuple[int, int], num_classes: int, batch: int = 2, seed: int = 0) -> dict:
    """``dict(inputs=[uint8 (3, H, W)], data_samples=[SegDataSample])`` with random labels."""
    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, *size), generator=gen, dtype=torch.uint8))
        label = torch.randint(0, num_classes, (1, *size), generator=gen)
        sample = SegDataSample(gt_sem_seg=PixelData(data=label))
        sample.set_metainfo(dict(img_shape=size, ori_shape=size, pad_shape=size))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)
