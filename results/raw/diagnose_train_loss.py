"""The baseline's CE on training crops per reduction (results/camvid_vit-t_in-loop-diagnosis.json).

Three batches of 8 from the CamVid training pipeline (random scale x0.5..x2, 352² crops, seed 0),
train mode with the head in eval mode (no dropout); prints the mean loss per reduction, then per
block the cosine and norm ratio of each reduction's gradient to the unreduced one's.
Run from the repository root: ``python results/raw/diagnose_train_loss.py``.
"""

import collections
import types

import torch
import torch.nn.functional as F
from diagnose_cross_eval import ARGS as EVAL_ARGS  # same folder: the shared settings
from diagnose_cross_eval import LOCAL06
from diagnose_cross_eval import REDUCTIONS as EVAL_REDUCTIONS
from mmengine.dataset import pseudo_collate
from mmseg.registry import DATASETS

from fatr_seg.analysis import camvid_runs as cr

torch.set_num_threads(1)
BASELINE = "work_dirs/baseline_500_352.pth"
ARGS = types.SimpleNamespace(
    **vars(EVAL_ARGS),
    distill_config="configs/camvid/fatr_vit-t_camvid_distill.py",
    ft_lr=1e-4,
    ft_iters=100,
    temperature=1.0,
    distill_weight=1.0,
    ema=False,
    ema_momentum=0.1,
)
REDUCTIONS = {
    "none": None,
    "local06": LOCAL06,
    "local06_noprop": dict(LOCAL06, prop_attn=False),
    "late07": EVAL_REDUCTIONS["late07"],
}


def block_grad(grads: dict, prefix: str) -> torch.Tensor:
    return torch.cat([g.flatten() for n, g in grads.items() if n.startswith(prefix)])


dataset = DATASETS.build(cr.finetune_cfg(ARGS, None, 0, "work_dirs/diag/tmp", BASELINE)
                         .train_dataloader.dataset)  # fmt: skip
torch.manual_seed(0)
batches = [pseudo_collate([dataset[i] for i in range(b * 8, b * 8 + 8)]) for b in range(3)]
grads = {}
for name, reduction in REDUCTIONS.items():
    cfg = cr.model_cfg(ARGS, reduction)
    cfg.model.backbone.drop_path_rate = 0.0
    model = cr.build_model(cfg, BASELINE).train()
    model.decode_head.eval()
    total, loss_sum = collections.defaultdict(float), 0.0
    for batch in batches:
        data = model.data_preprocessor(batch, True)
        losses = model.loss(data["inputs"], data["data_samples"])
        loss = sum(v for k, v in losses.items() if "loss" in k)
        model.zero_grad()
        loss.backward()
        loss_sum += loss.item()
        for n, p in model.named_parameters():
            if p.grad is not None and "omega" not in n:
                total[n] = total[n] + p.grad.detach().clone()
    grads[name] = total
    print(name, "loss", loss_sum / len(batches), flush=True)
for name in list(REDUCTIONS)[1:]:
    row = []
    for prefix in [f"backbone.blocks.{i}." for i in range(12)] + ["decode_head"]:
        a, b = block_grad(grads["none"], prefix), block_grad(grads[name], prefix)
        row.append(f"{F.cosine_similarity(a, b, 0).item():.2f}/{(b.norm() / a.norm()).item():.2f}")
    print(name, "gradient cosine / norm ratio per block, then the head:", row)
