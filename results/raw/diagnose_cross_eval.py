# Diagnostic (provenance of results/camvid_vit-t_in-loop-diagnosis.json): fine-tuned weights of the
# local-stage study (work_dirs/cs_352b) evaluated under other reductions; args: WEIGHTS:REDUCTION[:zeroomega],...
import json, sys, types, torch
torch.set_num_threads(2)
from mmseg.utils import register_all_modules
import fatr_seg.models
register_all_modules(init_default_scope=True)
from fatr_seg.analysis import camvid_runs as cr
from fatr_seg.models.convert import load_checkpoint_file
args = types.SimpleNamespace(baseline_config='configs/camvid/segmenter_vit-t_camvid.py',
    model_config='configs/camvid/fatr_vit-t_camvid.py', data_root='../shared/data/camvid',
    crop_size=352, batch_size=8, train_images=0, val_images=0, workers=1)
local06 = {'layers': [2, 5, 8], 'keep_ratio': [0.6, 0.7, 0.8], 'score': ['window_hf', 'hf_bipartite', 'hf_bipartite'], 'prop_attn': True}
R = {'fatr_local': {'method':'fatr_local'}, 'algm': {'method':'algm','keep_ratio':0.5797}, 'local07': dict(local06, keep_ratio=[0.7,0.7,0.8]), 'none': None, 'local06': local06, 'late07': {'method': 'fatr', 'keep_ratio': 0.7}}
W = {'base': 'work_dirs/baseline_500_352.pth', 'ft_none': 'work_dirs/cs_352b/runs/ft_none_s0/iter_100.pth',
     'ft_local06': 'work_dirs/cs_352b/runs/ft_local@0.6_s0/iter_100.pth',
     'ft_late07': 'work_dirs/cs_352b/runs/ft_fatr_late@0.7_s0/iter_100.pth'}
for spec in sys.argv[1].split(','):
    w, r, *mods = spec.split(':')
    cfg = cr.model_cfg(args, R[r])
    from mmseg.registry import MODELS
    m = MODELS.build(cfg.model)
    sd = load_checkpoint_file(W[w])
    if 'zeroomega' in mods:
        sd = {k: (torch.zeros_like(v) if 'omega1' in k else v) for k, v in sd.items()}
        print({k: v.abs().max().item() for k, v in load_checkpoint_file(W[w]).items() if 'omega' in k})
    res = m.load_state_dict(sd, strict=False)
    print('missing', res.missing_keys, 'unexpected', len(res.unexpected_keys))
    m.eval()
    out = cr.evaluate(m, cr.val_dataset(cfg))
    print(json.dumps(dict(weights=w, reduction=r, mods=mods, mIoU=round(out['mIoU'], 2))), flush=True)
