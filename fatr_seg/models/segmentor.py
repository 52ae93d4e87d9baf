"""``BatchedSlideEncoderDecoder``: mmseg's ``EncoderDecoder`` with batched sliding-window inference.

mmseg's ``slide_inference`` runs the crops of an image one window at a time (a batch of one crop
per image). All crops of a batch have the same size, so they can go through the model together:
this subclass stacks the crops of every window and every image into batches of at most
``test_cfg.crops_per_batch`` crops and adds their logits onto the image in mmseg's window order,
which gives mmseg's result (tested against its loop). Each image's token selection depends on
that crop alone (the reduction budget is per crop), so batching changes no selection.
"""

from __future__ import annotations

import torch
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS

__all__ = ["BatchedSlideEncoderDecoder", "slide_windows"]


def slide_windows(
    image: tuple[int, int], crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """mmseg's sliding windows ``(y1, y2, x1, x2)`` over an ``image`` (H, W), in its order.

    Windows step by ``stride``; the last row and column are moved back inside the image, and an
    image smaller than the crop gives crops of the image's size.

    Raises:
        ValueError: A stride or crop below 1, or a stride larger than the crop (pixels between
            two windows would be predicted by none).
    """
    for name, value in (("crop_size", crop), ("stride", stride)):
        if len(value) != 2 or min(value) < 1:
            raise ValueError(f"test_cfg.{name}={tuple(value)} must be two positive sizes (h, w)")
    if stride[0] > crop[0] or stride[1] > crop[1]:
        raise ValueError(
            f"test_cfg.stride={tuple(stride)} is larger than crop_size={tuple(crop)}: the pixels "
            "between two windows would get no prediction; use a stride <= the crop size"
        )
    (h_img, w_img), (h_crop, w_crop), (h_stride, w_stride) = image, crop, stride
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, h_img)
            x2 = min(w_idx * w_stride + w_crop, w_img)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


@MODELS.register_module()
class BatchedSlideEncoderDecoder(EncoderDecoder):
    """mmseg ``EncoderDecoder`` whose slide inference runs crops in batches.

    Takes ``EncoderDecoder``'s arguments. ``test_cfg=dict(mode='slide', crop_size=(h, w),
    stride=(sh, sw), crops_per_batch=N)``: at most N crops per forward (default: all crops of the
    batch at once; lower it to bound memory on large images). Whole-image inference and training
    are ``EncoderDecoder``'s.
    """

    def slide_inference(self, inputs: torch.Tensor, batch_img_metas: list[dict]) -> torch.Tensor:
        """Sliding-window logits (B, num_classes, H, W), equal to mmseg's ``slide_inference``."""
        crop = tuple(self.test_cfg.crop_size)
        windows = slide_windows(tuple(inputs.shape[2:]), crop, tuple(self.test_cfg.stride))
        limit = self.test_cfg.get("crops_per_batch")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"test_cfg.crops_per_batch={limit!r} must be a positive integer")
        B, _, H, W = inputs.shape
        # Window-major order: every pixel gets its windows' logits added in mmseg's order.
        crops = [(w, b) for w in range(len(windows)) for b in range(B)]
        per_batch = len(crops) if limit is None else limit
        preds = inputs.new_zeros((B, self.out_channels, H, W))
        count = inputs.new_zeros((1, 1, H, W))
        for y1, y2, x1, x2 in windows:
            count[:, :, y1:y2, x1:x2] += 1
        for start in range(0, len(crops), per_batch):
            chunk = crops[start : start + per_batch]
            imgs = torch.stack([inputs[b, :, y1:y2, x1:x2]
                                for w, b in chunk for y1, y2, x1, x2 in (windows[w],)])  # fmt: skip
            # As mmseg: the head resizes its logits to the crop (img_shape = the crop's size).
            metas = [dict(batch_img_metas[b], img_shape=imgs.shape[2:]) for _, b in chunk]
            logits = self.encode_decode(imgs, metas)
            for (w, b), logit in zip(chunk, logits, strict=True):
                y1, y2, x1, x2 = windows[w]
                preds[b, :, y1:y2, x1:x2] += logit
        return preds / count
