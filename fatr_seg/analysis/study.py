"""The token-reducer study behind ``tools/study.py``: runs, measurements and ``results.json``.

For every seed, :func:`run_study` trains a baseline ViT segmentor with the mmseg ``Runner``
(``reduction=None``); then, for each reducer at the same token budget, it measures mIoU
training-free on the baseline weights and after the same short fine-tuning (the baseline gets
that fine-tuning too, as ``none``), per-layer rank-collapse diagnostics
(:mod:`fatr_seg.analysis.rank_collapse`) and the IoU of FATR's and its peers' kept sets; then the
MACs (:func:`fatr_seg.analysis.flops.count_macs`) and images/s of every method's model. Each
result is saved in ``results.json`` as soon as it exists and reused by a later run with the same
settings (:class:`Store`). The table and plots are in :mod:`fatr_seg.analysis.study_report`.

``args`` is the namespace of ``tools/study.py`` after its defaults are applied: the keys of a
:data:`PRESETS` entry, plus ``quick``, ``work_dir``, ``data_root``, ``config``, ``methods``,
``layers``, ``keep_ratio``, ``shared_baseline``, ``threads`` and ``skip_bench``. mmseg and
mmengine are imported inside the functions that build, train or evaluate models.
"""

from __future__ import annotations

import gc
import json
import os
import os.path as osp
import statistics
import time

import numpy as np
import torch

from ..ops import num_keep
from .flops import count_macs
from .rank_collapse import layer_diagnostics, random_iou, trace_iou

__all__ = [
    "METHODS",
    "PRESETS",
    "VARIANTS",
    "Store",
    "build_model",
    "diagnostics",
    "forward_macs",
    "hf_iou",
    "log",
    "make_cfg",
    "reduction_cfg",
    "run_study",
    "test",
    "throughput",
    "train",
]

METHODS = ("fatr", "evit", "tome", "random")
# Optional variants: FATR with ``restore='residual'`` (folded patches keep their own feature).
VARIANTS = ("fatr-res",)

# ``default``: about 45 minutes on 2 free CPU cores. ``quick``: a smoke test for CI (< 2 min).
PRESETS = {
    "default": dict(
        img_size=128, patch_size=16, embed_dims=96, num_heads=3, depth=12, head_layers=1,
        num_train=240, num_val=40, batch_size=8, base_iters=600, ft_iters=150, base_lr=1e-3,
        ft_lr=2e-4, seeds=3, diag_images=16, bench_batch=8, bench_iters=10, bench_rounds=3,
    ),
    "quick": dict(
        img_size=64, patch_size=16, embed_dims=32, num_heads=2, depth=12, head_layers=1,
        num_train=8, num_val=4, batch_size=2, base_iters=6, ft_iters=3, base_lr=1e-3,
        ft_lr=2e-4, seeds=1, diag_images=2, bench_batch=2, bench_iters=2, bench_rounds=1,
    ),
}  # fmt: skip


def reduction_cfg(method: str | None, args) -> dict | None:
    """The ``reduction`` dict of ``method`` at the study's budget.

    FATR and its random-selection control use FATR's DC windows and reweighting; EViT and ToMe
    run as in their papers (no reweighting; EViT one fused token, ToMe merging).
    """
    if method is None:
        return None
    restore = "residual" if method == "fatr-res" else "dc"
    method = "fatr" if method == "fatr-res" else method
    red = dict(method=method, layers=tuple(args.layers), keep_ratio=args.keep_ratio)
    if method in ("fatr", "random"):
        red.update(windows=(2, 2, 1)[: len(args.layers)] if len(args.layers) <= 3
                   else (2,) * (len(args.layers) - 1) + (1,),
                   score="exact", reweight="identity", restore=restore)  # fmt: skip
    else:
        red.update(reweight=None, restore="dc")
    return red


def make_cfg(args, method, seed, work_dir, iters=0, lr=None, load_from=None):
    """The mmseg config of one run: the base config with the study's model, data and schedule."""
    from mmengine.config import Config

    from .camvid_runs import apply_schedule

    cfg = Config.fromfile(args.config)
    crop = (args.img_size, args.img_size)
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        dl = cfg[name]
        dl.dataset.data_root = args.data_root
        dl.num_workers = 0
        dl.persistent_workers = False
    cfg.train_dataloader.batch_size = args.batch_size
    for t in cfg.train_dataloader.dataset.pipeline:
        if t["type"] == "RandomCrop":
            t["crop_size"] = crop
    model = cfg.model
    model.data_preprocessor.size = crop
    bb = model.backbone
    red = reduction_cfg(method, args)
    bb.update(img_size=crop, patch_size=args.patch_size, embed_dims=args.embed_dims,
              num_heads=args.num_heads, num_layers=args.depth, drop_path_rate=0.0,
              reduction=red, init_cfg=None,
              compact_output=red is None or red["restore"] == "dc")  # fmt: skip
    # The Segmenter mask head on fused attention (the demo config has a linear decoder). With
    # restore='dc' it runs on the reduced tokens: the same logits as on the restored grid.
    model.decode_head = dict(
        type="FATRSegmenterHead", in_channels=args.embed_dims, channels=args.embed_dims,
        embed_dims=args.embed_dims, num_heads=args.num_heads, num_layers=args.head_layers,
        num_classes=model.decode_head.num_classes, dropout_ratio=0.0, drop_path_rate=0.0,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    )  # fmt: skip
    iters = max(int(iters), 1)
    cfg.optim_wrapper.optimizer.lr = lr or args.base_lr
    warm = max(1, min(50, iters // 10))
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=warm),
        dict(type="PolyLR", eta_min=lr_floor(lr or args.base_lr), power=1.0, by_epoch=False,
             begin=warm, end=iters),
    ]  # fmt: skip
    apply_schedule(cfg, iters, seed, work_dir, load_from=load_from, log_level="ERROR")
    return cfg


def lr_floor(lr: float) -> float:
    return lr * 0.01


def train(cfg) -> str:
    """Train with the mmseg Runner; returns the final checkpoint path."""
    from mmengine.runner import Runner

    ckpt = osp.join(cfg.work_dir, f"iter_{cfg.train_cfg['max_iters']}.pth")
    if osp.isfile(ckpt):
        return ckpt
    t0 = time.time()
    runner = Runner.from_cfg(cfg)
    runner.train()
    del runner
    log(
        f"trained {osp.basename(cfg.work_dir)}: {cfg.train_cfg['max_iters']} iters in "
        f"{time.time() - t0:.0f} s"
    )
    gc.collect()
    if not osp.isfile(ckpt):
        raise RuntimeError(f"training finished without writing {ckpt}")
    return ckpt


def test(cfg, model=None) -> float:
    """mIoU (%) of ``cfg.load_from`` (or of ``model``) on the validation split.

    The same dataset, pipeline, ``test_step`` and ``IoUMetric`` as ``Runner.test()``, without
    building a Runner for every evaluation (its start-up dominates the small runs here).
    """
    from mmengine.dataset import pseudo_collate
    from mmseg.registry import DATASETS, METRICS

    model = build_model(cfg, cfg.load_from) if model is None else model
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    metric = METRICS.build(cfg.test_evaluator)
    metric.dataset_meta = dataset.metainfo
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = pseudo_collate([dataset[i]])
            metric.process(batch, [o.to_dict() for o in model.test_step(batch)])
    return float(metric.evaluate(len(dataset))["mIoU"])


def build_model(cfg, ckpt: str | None):
    """The segmentor of ``cfg`` (eval mode) with ``ckpt`` loaded non-strictly.

    Reducer parameters absent from a baseline checkpoint (DC positional terms, reweighting ω)
    keep their identity initialisation, so training-free models equal the baseline until the
    first reduction.
    """
    from mmengine.runner import load_checkpoint
    from mmseg.registry import MODELS

    model = MODELS.build(cfg.model)
    if ckpt is not None:
        load_checkpoint(model, ckpt, map_location="cpu", strict=False, logger="silent")
    return model.eval()


def forward_macs(model, img_size: int) -> float:
    """MACs of one forward (backbone + decode head logits) on a (1, 3, S, S) input.

    Counted by :func:`fatr_seg.analysis.flops.count_macs`: ``FlopCounterMode`` plus the formulas
    it lacks (the fused CPU attention op, in-place matmuls), gather/scatter kept apart.
    """
    x = torch.randn(1, 3, img_size, img_size)
    return float(count_macs(model, x, mode="tensor").macs)


@torch.no_grad()
def throughput(models: dict, args) -> dict:
    """Images/s per model: forward only, batch ``bench_batch``, methods timed round-robin."""
    x = torch.randn(args.bench_batch, 3, args.img_size, args.img_size)
    rates = {name: [] for name in models}
    for model in models.values():  # warm-up
        for _ in range(2):
            model(x, mode="tensor")
    for _ in range(args.bench_rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            for _ in range(args.bench_iters):
                model(x, mode="tensor")
            rates[name].append(args.bench_batch * args.bench_iters / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def load_val_images(args, n: int) -> torch.Tensor:
    """The first ``n`` validation images, normalised like the data preprocessor, (n, 3, S, S)."""
    from PIL import Image

    folder = osp.join(args.data_root, "images", "validation")
    names = sorted(os.listdir(folder))[:n]
    imgs = [np.asarray(Image.open(osp.join(folder, f)).convert("RGB"), np.float32) for f in names]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    return (x - 127.5) / 127.5


def diagnostics(model, x) -> dict:
    """Per-layer rank-collapse diagnostics of ``model``'s backbone on images ``x``, as lists."""
    d = layer_diagnostics(model.backbone, x)
    return {k: v.tolist() for k, v in d._asdict().items()}


def hf_iou(model_a, model_b, x) -> list:
    """Per-reduction-layer IoU of the kept sets of two reduced backbones on the same images."""
    return trace_iou(
        model_a.backbone.reduction_trace(x), model_b.backbone.reduction_trace(x)
    ).tolist()


class Store:
    """``results.json``, written after every step; a key already present is not recomputed.

    Args:
        path: The JSON file.
        settings: What the results depend on. A file made with other settings is replaced
            (``strict=False``) or refused with a ``ValueError`` naming the differences
            (``strict=True``).
        extendable: Settings that may differ from the file's (e.g. ``seeds``: a run can be
            extended); the new values are recorded.
        strict: Refuse a file made with other settings instead of starting afresh.
    """

    def __init__(self, path: str, settings: dict, extendable: tuple[str, ...] = ("seeds",),
                 strict: bool = False) -> None:  # fmt: skip
        self.path = path
        self.data = {"settings": settings, "runs": {}}
        if not osp.isfile(path):
            return
        with open(path) as f:
            old = json.load(f)
        old_settings = old.get("settings", {})
        ours = json.loads(json.dumps(settings))  # tuples as the file holds them: lists
        diff = sorted(k for k in set(old_settings) | set(ours) if k not in extendable
                      and old_settings.get(k) != ours.get(k))  # fmt: skip
        if not diff:
            old["settings"] = settings
            self.data = old
        elif strict:
            changes = ", ".join(f"{k}: {old_settings.get(k)!r} -> {ours.get(k)!r}" for k in diff)
            raise ValueError(
                f"{path} holds results made with other settings ({changes}): use the same "
                "options to resume, or another --work-dir"
            )

    def get(self, key):
        return self.data["runs"].get(key)

    def put(self, key, value) -> None:
        self.data["runs"][key] = value
        self.save()

    def save(self) -> None:
        """Write the file (atomically: a new file, then renamed over the old one)."""
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def cached(store: Store, key: str, fn):
    value = store.get(key)
    if value is None:
        t0 = time.time()
        value = fn()
        store.put(key, value)
        log(f"{key}: {fmt_short(value)} ({time.time() - t0:.0f} s)")
    return value


def fmt_short(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    s = json.dumps(v)
    return s if len(s) < 100 else s[:97] + "..."


_T0 = time.time()


def log(msg: str) -> None:
    print(f"[study {time.time() - _T0:6.0f}s] {msg}", flush=True)


def run_study(args) -> dict:
    """Run (or resume) the whole study; returns the content of ``results.json``."""
    from mmseg.utils import register_all_modules

    from ..datasets import write_dataset
    from ..models import allow_mmengine_checkpoints  # also registers FATRViT

    register_all_modules(init_default_scope=True)
    allow_mmengine_checkpoints()  # build_model loads the baselines' Runner checkpoints
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    # Runs are cached by settings; the seed count is left out so a run can be extended or cut.
    settings = {k: v for k, v in vars(args).items() if k not in ("threads", "skip_bench", "seeds")}
    store = Store(osp.join(args.work_dir, "results.json"), settings)
    write_dataset(args.data_root, args.num_train, args.num_val, args.img_size, seed=0)
    log(f"data: {args.num_train} train / {args.num_val} val images of {args.img_size}² in "
        f"{args.data_root}")  # fmt: skip
    methods = list(args.methods)
    x_diag = load_val_images(args, args.diag_images)
    ckpt_dir = osp.join(args.work_dir, "runs")

    for seed in range(args.seeds):
        base_seed = 0 if args.shared_baseline else seed
        base_dir = osp.join(ckpt_dir, f"baseline_s{base_seed}")
        base_cfg = make_cfg(args, None, base_seed, base_dir, args.base_iters, args.base_lr)
        base_ckpt = train(base_cfg)
        base_test = make_cfg(args, None, base_seed, base_dir, load_from=base_ckpt)
        cached(store, f"s{seed}/none/free/miou", lambda c=base_test: test(c))
        base_model = build_model(base_test, base_ckpt)
        cached(store, f"s{seed}/none/free/diag", lambda m=base_model: diagnostics(m, x_diag))
        free_models = {}
        for method in [None, *methods]:
            name = method or "none"
            if method is not None:
                cfg = make_cfg(args, method, seed, osp.join(ckpt_dir, f"{name}_free_s{seed}"),
                               load_from=base_ckpt)  # fmt: skip
                cached(store, f"s{seed}/{name}/free/miou", lambda c=cfg: test(c))
                free_models[name] = build_model(cfg, base_ckpt)
                torch.manual_seed(seed)
                cached(store, f"s{seed}/{name}/free/diag",
                       lambda m=free_models[name]: diagnostics(m, x_diag))  # fmt: skip
            ft_dir = osp.join(ckpt_dir, f"{name}_ft_s{seed}")
            cfg = make_cfg(args, method, seed, ft_dir, args.ft_iters, args.ft_lr, base_ckpt)
            ckpt = train(cfg)
            test_cfg = make_cfg(args, method, seed, ft_dir, load_from=ckpt)
            cached(store, f"s{seed}/{name}/ft/miou", lambda c=test_cfg: test(c))
            ft_model = build_model(test_cfg, ckpt)
            torch.manual_seed(seed)
            cached(store, f"s{seed}/{name}/ft/diag", lambda m=ft_model: diagnostics(m, x_diag))
            if method is not None:
                free_models[name + "_ft"] = ft_model
        if "fatr" in methods and "evit" in methods:
            cached(
                store,
                f"s{seed}/iou/fatr_evit/free",
                lambda a=free_models["fatr"], b=free_models["evit"]: hf_iou(a, b, x_diag),
            )
            cached(
                store,
                f"s{seed}/iou/fatr_evit/ft",
                lambda a=free_models["fatr_ft"], b=free_models["evit_ft"]: hf_iou(a, b, x_diag),
            )
        if "fatr" in methods and "random" in methods:
            torch.manual_seed(seed)
            cached(
                store,
                f"s{seed}/iou/fatr_random/free",
                lambda a=free_models["fatr"], b=free_models["random"]: hf_iou(a, b, x_diag),
            )
        del free_models, base_model
        gc.collect()

    # Cost: MACs and images/s of each method's model (weights do not matter for either).
    models = {"none": build_model(make_cfg(args, None, 0, args.work_dir), None)}
    for m in methods:
        models[m] = build_model(make_cfg(args, m, 0, args.work_dir), None)
    cached(store, "macs", lambda: {n: forward_macs(m, args.img_size) for n, m in models.items()})
    if not args.skip_bench:
        cached(store, "images_per_s", lambda: throughput(models, args))
    grid = (args.img_size // args.patch_size) ** 2
    budget, chance, m_left = [], [], grid
    for _ in args.layers:
        k = num_keep(args.keep_ratio, m_left)
        budget.append(k)
        chance.append(random_iou(k, grid))
        m_left = k
    store.data["settings"]["seeds"] = args.seeds  # the seeds this report covers
    store.put("budget", {"grid": grid, "kept_per_layer": budget, "chance_iou_fixed_grid": chance})
    return store.data
