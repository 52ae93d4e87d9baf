"""Side-by-side accuracy study of the token reducers on the synthetic ADE20K-layout set.

``python tools/study.py [--quick] [--work-dir work_dirs/study] [--seeds 3] ...``

For every seed: train a baseline ViT segmentor (mmseg Runner, ``reduction=None``); then, for each
reducer (``fatr``, ``evit``, ``tome``, ``random``) at the same token budget (the same reduction
layers and ``keep_ratio``), measure mIoU training-free on the baseline weights and after the same
short fine-tuning. The unreduced baseline gets the same fine-tuning too (``none``), so the extra
iterations are not mistaken for a gain of the reducers. Then, on one machine in one process:

* MACs of one forward (``torch.utils.flop_counter.FlopCounterMode``; the fused CPU attention op
  has no handler there, so it gets one below, otherwise attention would count zero);
* images/s (forward only, methods timed round-robin so background load hits all alike);
* per-layer rank-collapse diagnostics (:mod:`fatr_seg.analysis.rank_collapse`);
* per-layer IoU between FATR's HF set and EViT's kept set on the same weights and images.

Writes ``results.json``, ``table.md`` and ``*.png`` plots under ``--work-dir``. Results are saved
after every step and reused on a re-run with the same settings (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import os.path as osp
import statistics
import sys
import time
import warnings

# mmengine and mmcv import pkg_resources (hence setuptools < 81); its deprecation notice is noise.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

REPO = osp.abspath(osp.join(osp.dirname(osp.abspath(__file__)), ".."))
sys.path.insert(0, REPO)

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CI-sized run (1 seed, few iters)")
    p.add_argument("--work-dir", default=osp.join("work_dirs", "study"))
    p.add_argument("--data-root", help="synthetic data folder (default: WORK_DIR/data)")
    p.add_argument(
        "--config",
        default=osp.join(REPO, "configs", "fatr_ade20k_demo.py"),
        help="base config (the embedded default); model and schedule are overridden",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + VARIANTS)
    p.add_argument("--layers", nargs="+", type=int, default=[4, 7, 10],
                   help="1-indexed reduction blocks")  # fmt: skip
    p.add_argument("--keep-ratio", type=float, default=0.7)
    p.add_argument(
        "--shared-baseline",
        action="store_true",
        help="train ONE baseline (seed 0) and vary only the fine-tuning seed",
    )
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (default 1: the models are tiny, and on a loaded machine two "
        "OpenMP threads waiting on each other made a training step 30x slower)",
    )  # fmt: skip
    p.add_argument("--skip-bench", action="store_true", help="no throughput timing")
    for key, value in PRESETS["default"].items():
        flag = "--" + key.replace("_", "-")
        p.add_argument(flag, type=type(value), help=f"default {value} (quick: "
                       f"{PRESETS['quick'][key]})")  # fmt: skip
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "default"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.data_root is None:
        args.data_root = osp.join(args.work_dir, "data")
    if args.depth < max(args.layers):
        p.error(f"--depth {args.depth} is smaller than the last reduction layer {max(args.layers)}")
    return args


# ----------------------------------------------------------------------------- configs


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
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters + 1)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=iters,
                                        max_keep_ckpts=1)  # fmt: skip
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=max(1, iters // 20),
                                    log_metric_by_epoch=False)  # fmt: skip
    cfg.randomness = dict(seed=seed)
    cfg.work_dir = work_dir
    cfg.load_from = load_from
    cfg.resume = False
    cfg.log_level = "ERROR"
    cfg.experiment_name = f"{osp.basename(work_dir)}_{time.time_ns()}"
    return cfg


def lr_floor(lr: float) -> float:
    return lr * 0.01


# ----------------------------------------------------------------------------- runs


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


# ----------------------------------------------------------------------------- measurements


def _cpu_flash_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    # aten._scaled_dot_product_flash_attention_for_cpu: the same two matmuls as any SDPA.
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def count_macs(model, img_size: int) -> float:
    """MACs of one forward (backbone + decode head logits) on a (1, 3, S, S) input.

    Uses :func:`fatr_seg.analysis.flops.count_macs` (which also covers in-place matmuls and keeps
    gather/scatter apart) when present, else ``FlopCounterMode`` with the attention handler above.
    """
    x = torch.randn(1, 3, img_size, img_size)
    try:
        from fatr_seg.analysis.flops import count_macs as analysis_count_macs
    except ImportError:
        analysis_count_macs = None
    if analysis_count_macs is not None:
        return float(analysis_count_macs(model, x, mode="tensor").macs)
    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flop}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(x, mode="tensor")
    return counter.get_total_flops() / 2  # FlopCounterMode counts 2 FLOPs per MAC


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
    from fatr_seg.analysis.rank_collapse import layer_diagnostics

    d = layer_diagnostics(model.backbone, x)
    return {k: v.tolist() for k, v in d._asdict().items()}


def hf_iou(model_a, model_b, x) -> list:
    from fatr_seg.analysis.rank_collapse import trace_iou

    return trace_iou(
        model_a.backbone.reduction_trace(x), model_b.backbone.reduction_trace(x)
    ).tolist()


# ----------------------------------------------------------------------------- study


class Store:
    """``results.json``, written after every step; a key already present is not recomputed."""

    def __init__(self, path: str, settings: dict) -> None:
        self.path = path
        self.data = {"settings": settings, "runs": {}}
        if osp.isfile(path):
            with open(path) as f:
                old = json.load(f)
            old_settings = {k: v for k, v in old.get("settings", {}).items() if k != "seeds"}
            if old_settings == settings:
                self.data = old

    def get(self, key):
        return self.data["runs"].get(key)

    def put(self, key, value) -> None:
        self.data["runs"][key] = value
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
    from mmseg.utils import register_all_modules

    import fatr_seg.models  # noqa: F401  (registers FATRViT)
    from fatr_seg.analysis.rank_collapse import random_iou
    from fatr_seg.datasets import write_dataset
    from fatr_seg.ops import num_keep

    register_all_modules(init_default_scope=True)
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
    cached(store, "macs", lambda: {n: count_macs(m, args.img_size) for n, m in models.items()})
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


# ----------------------------------------------------------------------------- report


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: list[float], digits: int = 1) -> str:
    m, s = mean_std(values)
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def collect(data: dict, method: str, phase: str, field: str) -> list:
    runs, seeds = data["runs"], data["settings"]["seeds"]
    return [runs[k] for s in range(seeds) if (k := f"s{s}/{method}/{phase}/{field}") in runs]


def layer_mean(data, method, phase, key) -> list[float]:
    diags = collect(data, method, phase, "diag")
    if not diags:
        return []
    return np.mean([d[key] for d in diags], axis=0).tolist()


def write_report(data: dict, work_dir: str) -> str:
    st, runs = data["settings"], data["runs"]
    names = ["none", *st["methods"]]
    macs, ips = runs.get("macs", {}), runs.get("images_per_s", {})
    base_macs = macs.get("none")
    lines = [
        "# Token-reducer study (synthetic ADE20K-layout data)",
        "",
        f"Model: ViT (C={st['embed_dims']}, depth {st['depth']}, {st['num_heads']} heads, patch "
        f"{st['patch_size']}) + Segmenter mask head ({st['head_layers']} layer), "
        f"{st['img_size']}² inputs; {st['num_train']} train / {st['num_val']} val images; "
        f"baseline {st['base_iters']} iters (lr {st['base_lr']}), fine-tuning {st['ft_iters']} "
        f"iters (lr {st['ft_lr']}), batch {st['batch_size']}; seeds: {st['seeds']}"
        f"{' (one shared baseline)' if st['shared_baseline'] else ''}. Reduction at blocks "
        f"{tuple(st['layers'])}, keep_ratio {st['keep_ratio']}; "
        f"kept patch tokens per layer: {runs.get('budget', {}).get('kept_per_layer')} of "
        f"{runs.get('budget', {}).get('grid')}.",
        "",
        "| method | mIoU training-free | mIoU fine-tuned | GMACs | MACs vs none | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        free, ft = collect(data, n, "free", "miou"), collect(data, n, "ft", "miou")
        mac = macs.get(n)
        rel = f"{100 * (mac / base_macs - 1):+.1f} %" if mac and base_macs else "n/a"
        lines.append(
            f"| {n} | {pm(free, 2)} | {pm(ft, 2)} | "
            f"{mac / 1e9:.4f} | {rel} | {f'{ips[n]:.1f}' if n in ips else 'n/a'} |"
            if mac
            else f"| {n} | {pm(free, 2)} | {pm(ft, 2)} | n/a | n/a | n/a |"
        )
    lines += ["", "mIoU in %, mean ± std over seeds. `none` = no reduction ('free' = the "
              "baseline itself, 'fine-tuned' = the baseline trained for the same extra iters).",
              "", "## Per-layer diagnostics (fine-tuned models, mean over seeds)", ""]  # fmt: skip
    depth = st["depth"]
    header = "| quantity | method | " + " | ".join(str(i + 1) for i in range(depth)) + " |"
    lines += [header, "|---|---|" + "---|" * depth]
    for key, label in (("hf_restored", "‖H_f‖/‖X‖ restored grid"),
                       ("hf_tokens", "‖H_f‖/‖X‖ token set"),
                       ("cos_to_last", "cos to last layer"),
                       ("num_tokens", "tokens (no CLS)")):  # fmt: skip
        for n in names:
            vals = layer_mean(data, n, "ft", key)
            if vals:
                digits = 0 if key == "num_tokens" else 3
                lines.append(f"| {label} | {n} | " + " | ".join(f"{v:.{digits}f}" for v in vals)
                             + " |")  # fmt: skip
    iou_keys = [("fatr_evit/free", "FATR vs EViT, baseline weights (training-free)"),
                ("fatr_evit/ft", "FATR vs EViT, each fine-tuned"),
                ("fatr_random/free", "FATR vs random, baseline weights")]  # fmt: skip
    lines += ["", "## HF-set IoU per reduction layer", "",
              "| pair | " + " | ".join(f"layer {i}" for i in st["layers"]) + " |",
              "|---|" + "---|" * len(st["layers"])]  # fmt: skip
    for key, label in iou_keys:
        vals = [runs[k] for s in range(st["seeds"]) if (k := f"s{s}/iou/{key}") in runs]
        if vals:
            cells = [pm([v[i] for v in vals], 3) for i in range(len(st["layers"]))]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    chance = runs.get("budget", {}).get("chance_iou_fixed_grid")
    if chance:
        lines.append("| chance (two random kept sets of the same sizes) | "
                     + " | ".join(f"{c:.3f}" for c in chance) + " |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    with open(osp.join(work_dir, "table.md"), "w") as f:
        f.write(text)
    return text


def plot(data: dict, work_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = data["settings"]
    names = ["none", *st["methods"]]
    layers = np.arange(1, st["depth"] + 1)
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("hf_restored", "hf_tokens", "cos_to_last"),
                              ("‖H_f[X]‖/‖X‖, restored grid", "‖H_f[X]‖/‖X‖, token set",
                               "cosine similarity to last layer"), strict=True):  # fmt: skip
        for n in names:
            vals = layer_mean(data, n, "ft", key)
            if vals:
                ax.plot(layers, vals, marker="o", label=n)
        for r in st["layers"]:
            ax.axvline(r, color="grey", lw=0.5, ls="--")
        ax.set_xlabel("block")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    paths.append(osp.join(work_dir, "rank_collapse.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.38
    for j, phase in enumerate(("free", "ft")):
        means, stds = zip(*(mean_std(collect(data, n, phase, "miou")) for n in names), strict=True)
        ax.bar(np.arange(len(names)) + (j - 0.5) * w, means, w, yerr=stds, capsize=3,
               label="training-free" if phase == "free" else "fine-tuned")  # fmt: skip
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("mIoU (%)")
    ax.legend()
    fig.tight_layout()
    paths.append(osp.join(work_dir, "miou.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    runs = data["runs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("fatr_evit/free", "FATR vs EViT (training-free)"),
                       ("fatr_evit/ft", "FATR vs EViT (fine-tuned)"),
                       ("fatr_random/free", "FATR vs random")):  # fmt: skip
        vals = [runs[k] for s in range(st["seeds"]) if (k := f"s{s}/iou/{key}") in runs]
        if vals:
            ax.plot(st["layers"], np.mean(vals, axis=0), marker="o", label=label)
    chance = runs.get("budget", {}).get("chance_iou_fixed_grid")
    if chance:
        ax.plot(st["layers"], chance, ls="--", color="grey", label="chance")
    ax.set_xlabel("reduction block")
    ax.set_ylabel("IoU of kept sets")
    ax.legend()
    fig.tight_layout()
    paths.append(osp.join(work_dir, "hf_iou.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def main(argv=None) -> None:
    args = parse_args(argv)
    log(f"settings: {vars(args)}")
    data = run_study(args)
    print(write_report(data, args.work_dir))
    for path in plot(data, args.work_dir):
        log(f"wrote {path}")
    log(f"done; results in {osp.join(args.work_dir, 'results.json')}")


if __name__ == "__main__":
    main()
