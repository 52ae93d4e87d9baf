"""Fine-tuned weights under other reductions (results/camvid_vit-t_in-loop-diagnosis.json).

Checkpoints of the local-stage study (work_dirs/cs_352b: results/camvid_vit-t_local-stage.json).
Run from the repository root: ``python results/raw/diagnose_cross_eval.py WEIGHTS:REDUCTION,...``
with an optional third field ``zeroomega`` (omega1 reset to 0). Prints one JSON line per pair.
"""

import json
import sys
import types

import torch
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules

import fatr_seg.models  # noqa: F401  (registers FATRViT and the CamVid dataset)
from fatr_seg.analysis import camvid_runs as cr
from fatr_seg.models.convert import load_checkpoint_file

torch.set_num_threads(2)
register_all_modules(init_default_scope=True)
ARGS = types.SimpleNamespace(
    baseline_config="configs/camvid/segmenter_vit-t_camvid.py",
    model_config="configs/camvid/fatr_vit-t_camvid.py",
    data_root="../shared/data/camvid",
    crop_size=352,
    batch_size=8,
    train_images=0,
    val_images=0,
    workers=1,
)
LOCAL06 = {
    "layers": [2, 5, 8],
    "keep_ratio": [0.6, 0.7, 0.8],
    "score": ["window_hf", "hf_bipartite", "hf_bipartite"],
    "prop_attn": True,
}
REDUCTIONS = {
    "none": None,
    "local06": LOCAL06,
    "local07": dict(LOCAL06, keep_ratio=[0.7, 0.7, 0.8]),
    "fatr_local": dict(LOCAL06, keep_ratio=[0.5, 0.6, 0.8]),  # the preset when it ran
    "late07": {"method": "fatr", "keep_ratio": 0.7},
    "algm": {"method": "algm", "keep_ratio": 0.5797},
}
RUNS = "work_dirs/cs_352b/runs"
WEIGHTS = {
    "base": "work_dirs/baseline_500_352.pth",
    "ft_none": f"{RUNS}/ft_none_s0/iter_100.pth",
    "ft_local06": f"{RUNS}/ft_local@0.6_s0/iter_100.pth",
    "ft_late07": f"{RUNS}/ft_fatr_late@0.7_s0/iter_100.pth",
}


def main(specs: str) -> None:
    for spec in specs.split(","):
        cross_eval(*spec.split(":"))


def cross_eval(weights: str, reduction: str, *mods: str) -> None:
    cfg = cr.model_cfg(ARGS, REDUCTIONS[reduction])
    model = MODELS.build(cfg.model)
    state = load_checkpoint_file(WEIGHTS[weights])
    if "zeroomega" in mods:
        state = {k: torch.zeros_like(v) if "omega1" in k else v for k, v in state.items()}
    # Reduction parameters absent from a checkpoint keep their identity init.
    model.load_state_dict(state, strict=False)
    miou = cr.evaluate(model.eval(), cr.val_dataset(cfg))["mIoU"]
    row = dict(weights=weights, reduction=reduction, mods=list(mods), mIoU=round(miou, 2))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
