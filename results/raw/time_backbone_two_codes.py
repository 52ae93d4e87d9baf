"""CPU time of the default's ViT-S/16 backbone on whichever code ``PYTHONPATH`` points at.

Run once per code, alternating codes (results/op_counts.json, ``cpu_time_cls_slot``):
``PYTHONPATH=<code> python results/raw/time_backbone_two_codes.py <batch>``; prints the thread
CPU time of 5 forwards after a warm-up, 512², 1 thread, random weights.
"""

import json
import sys
import time

import torch

from fatr_seg.layers import FATRVisionTransformer

torch.set_num_threads(1)
torch.manual_seed(0)
batch = int(sys.argv[1])
model = FATRVisionTransformer(img_size=512, patch_size=16, embed_dims=384, num_layers=12,
                              num_heads=6, reduction=dict(method="fatr_local")).eval()  # fmt: skip
x = torch.randn(batch, 3, 512, 512)
times = []
with torch.inference_mode():
    model(x)
    for _ in range(5):
        start = time.thread_time()
        model(x)
        times.append(time.thread_time() - start)
print(json.dumps(times))
