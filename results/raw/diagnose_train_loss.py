# Diagnostic (provenance of results/camvid_vit-t_in-loop-diagnosis.json): CE loss and gradients of
# the baseline on 3 training batches (352² crops, the training pipeline), per reduction.
import types, torch, collections
torch.set_num_threads(1)
from mmseg.utils import register_all_modules
import fatr_seg.models
register_all_modules(init_default_scope=True)
from fatr_seg.analysis import camvid_runs as cr
from mmseg.registry import DATASETS
from mmengine.dataset import pseudo_collate
args = types.SimpleNamespace(baseline_config='configs/camvid/segmenter_vit-t_camvid.py',
    model_config='configs/camvid/fatr_vit-t_camvid.py', data_root='../shared/data/camvid',
    crop_size=352, batch_size=8, train_images=0, val_images=0, workers=1, ft_lr=1e-4, ft_iters=100,
    temperature=1.0, distill_weight=1.0, ema=False, ema_momentum=0.1,
    distill_config='configs/camvid/fatr_vit-t_camvid_distill.py')
local06 = {'layers': [2, 5, 8], 'keep_ratio': [0.6, 0.7, 0.8], 'score': ['window_hf', 'hf_bipartite', 'hf_bipartite'], 'prop_attn': True}
cfg0 = cr.finetune_cfg(args, None, 0, 'work_dirs/diag/tmp', 'work_dirs/baseline_500_352.pth')
ds = DATASETS.build(cfg0.train_dataloader.dataset)
torch.manual_seed(0)
batches = [pseudo_collate([ds[i] for i in range(b*8, b*8+8)]) for b in range(3)]
G = {}
for name, red in [('none', None), ('local06', local06), ('local06_noprop', dict(local06, prop_attn=False)), ('late07', {'method':'fatr','keep_ratio':0.7})]:
    cfg = cr.model_cfg(args, red); cfg.model.backbone.drop_path_rate = 0.0
    m = cr.build_model(cfg, 'work_dirs/baseline_500_352.pth'); m.train(); m.decode_head.eval()
    g = collections.defaultdict(float); L = 0
    for b in batches:
        data = m.data_preprocessor(b, True)
        losses = m.loss(data['inputs'], data['data_samples'])
        loss = sum(v for k, v in losses.items() if 'loss' in k)
        m.zero_grad(); loss.backward(); L += loss.item()
        for n, p in m.named_parameters():
            if p.grad is not None and 'omega' not in n:
                g[n] = g[n] + p.grad.detach().clone()
    G[name] = g
    print(name, 'loss', L / 3, flush=True)
def blockvec(g, i):
    return torch.cat([v.flatten() for n, v in g.items() if n.startswith(f'backbone.blocks.{i}.')])
for name in G:
    if name == 'none': continue
    row = []
    for i in range(12):
        a, b = blockvec(G['none'], i), blockvec(G[name], i)
        row.append(f"{torch.nn.functional.cosine_similarity(a, b, 0).item():.2f}/{(b.norm()/a.norm()).item():.2f}")
    pe = lambda g: torch.cat([g[k].flatten() for k in ('backbone.pos_embed','backbone.patch_embed.proj.weight') if k in g])
    print(name, 'cos/normratio per block', row, 'embed', f"{torch.nn.functional.cosine_similarity(pe(G['none']), pe(G[name]), 0).item():.2f}/{(pe(G[name]).norm()/pe(G['none']).norm()).item():.2f}")
    hd = lambda g: torch.cat([v.flatten() for n, v in g.items() if n.startswith('decode_head')])
    print(name, 'head', f"{torch.nn.functional.cosine_similarity(hd(G['none']), hd(G[name]), 0).item():.2f}/{(hd(G[name]).norm()/hd(G['none']).norm()).item():.2f}")
