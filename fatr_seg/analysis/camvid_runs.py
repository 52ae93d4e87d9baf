"""Configs, training runs, models and measurements of the CamVid study.

Every model comes from the repository's CamVid configs, changed only where the study says so
(data, crop, batch, schedule, reduction, iterations); every training run is mmengine's
``Runner``, as ``tools/train.py`` runs it. mmseg and mmengine are imported inside the functions.
"""

from __future__ import annotations

import copy
import gc
import os.path as osp
import time

import numpy as np
import torch

from .timing import iteration_time

__all__ = ["StudyError", "apply_schedule", "baseline_cfg", "build_model", "cost", "evaluate",
           "finetune_cfg", "load_cfg", "model_cfg", "train", "val_dataset",
           "val_inputs"]  # fmt: skip


class StudyError(RuntimeError):
    """A setting, file or folder the study needs is wrong or missing (the message names it)."""


def load_cfg(path: str):
    """An mmengine ``Config`` from ``path``; a missing file is a :class:`StudyError`."""
    from mmengine.config import Config

    if not osp.isfile(path):
        raise StudyError(f"config not found: {path}")
    return Config.fromfile(path)


def _apply_data(cfg, args, train: bool) -> None:
    """Data location, image subsets, workers and the training crop of ``args``."""
    crop = (args.crop_size, args.crop_size)
    loaders = ("train_dataloader", "val_dataloader") if train else ("val_dataloader",)
    for name in loaders:
        dl = cfg[name]
        dl.dataset.data_root = args.data_root
        dl.num_workers = args.workers
        dl.persistent_workers = False
        count = args.train_images if name == "train_dataloader" else args.val_images
        if count:
            dl.dataset.indices = count  # mmengine's BaseDataset: the first `count` samples
    for name in ("test_dataloader", "test_cfg", "test_evaluator"):
        cfg[name] = None  # CamVid's test split is not part of the study
    if train:
        cfg.train_dataloader.batch_size = args.batch_size
        for t in cfg.train_dataloader.dataset.pipeline:
            if t["type"] == "RandomCrop":
                t["crop_size"] = crop
        for name in ("val_dataloader", "val_cfg", "val_evaluator"):
            cfg[name] = None  # the study evaluates every model itself (:func:`evaluate`)
    # The positional embedding is stored at the training crop's grid (16x16 at 256²), so the
    # evaluated models are built the same way; any input size is interpolated at run time.
    cfg.model.data_preprocessor.size = crop
    if "model_kwargs" in cfg.model.backbone:  # TimmFATRViT: the size goes to timm.create_model
        cfg.model.backbone.model_kwargs.img_size = crop
    else:
        cfg.model.backbone.img_size = crop


def apply_schedule(cfg, iters: int, seed: int, work_dir: str, load_from: str | None = None,
                   log_level: str = "WARNING") -> None:  # fmt: skip
    """Make ``cfg`` one Runner training of ``iters`` iterations in ``work_dir``: no validation,
    one checkpoint at the end without optimizer state, ``seed`` for every random stream. The
    experiment and its visualizer get names of their own: mmengine keeps one instance per name for
    the whole process, and every later run would log into the first run's folder."""
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters + 1)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=iters,
                                        max_keep_ckpts=1, save_optimizer=False,
                                        save_best=None)  # fmt: skip
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=max(1, min(50, iters // 20)),
                                    log_metric_by_epoch=False)  # fmt: skip
    cfg.randomness = dict(seed=seed)
    cfg.work_dir = work_dir
    cfg.load_from = load_from
    cfg.resume = False
    cfg.launcher = "none"
    cfg.log_level = log_level
    cfg.experiment_name = f"{osp.basename(work_dir)}_{time.time_ns()}"
    if "visualizer" in cfg:
        cfg.visualizer.name = cfg.experiment_name


def baseline_cfg(args, seed: int, work_dir: str):
    """The baseline's training config: the unreduced Segmenter from the ImageNet ViT-Ti, AdamW,
    the decode head at ``head_lr_mult`` × lr, linear warm-up from 1 % then poly decay."""
    cfg = load_cfg(args.baseline_config)
    _apply_data(cfg, args, train=True)
    if args.pretrained:
        cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=args.pretrained)
    iters = args.base_iters
    cfg.optim_wrapper = dict(
        type="OptimWrapper",
        optimizer=dict(type="AdamW", lr=args.base_lr, weight_decay=args.weight_decay),
        paramwise_cfg=dict(custom_keys={"decode_head": dict(lr_mult=args.head_lr_mult)}),
    )
    warm = min(args.warmup_iters, iters - 1)
    poly = dict(type="PolyLR", eta_min=0.0, power=1.0, by_epoch=False, begin=max(warm, 0),
                end=iters)  # fmt: skip
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0,
                                end=warm), poly] if warm > 0 else [poly]  # fmt: skip
    apply_schedule(cfg, iters, seed, work_dir)
    return cfg


def finetune_cfg(args, reduction: dict | None, seed: int, work_dir: str, teacher: str):
    """A fine-tuning config with ``reduction`` (None: unreduced): the distillation recipe from
    the baseline (teacher and starting point), AdamW with cosine decay, EMA."""
    cfg = load_cfg(args.distill_config)
    _apply_data(cfg, args, train=True)
    model = cfg.model
    model.backbone.reduction = copy.deepcopy(reduction)
    model.teacher_checkpoint = teacher
    model.distill_temperature = args.temperature
    model.distill_weight = args.distill_weight
    cfg.optim_wrapper.optimizer.lr = args.ft_lr
    iters = args.ft_iters
    cfg.param_scheduler = [dict(type="CosineAnnealingLR", T_max=iters, eta_min=args.ft_lr * 0.01,
                                by_epoch=False, begin=0, end=iters)]  # fmt: skip
    cfg.custom_hooks = [
        dict(type="EMAHook", ema_type="ExponentialMovingAverage", momentum=args.ema_momentum)
    ] if args.ema else []  # fmt: skip
    apply_schedule(cfg, iters, seed, work_dir)
    return cfg


def model_cfg(args, reduction: dict | None):
    """The config of a model to evaluate: the plain segmentor with ``reduction``, no weights."""
    cfg = load_cfg(args.baseline_config if reduction is None else args.model_config)
    _apply_data(cfg, args, train=False)
    if reduction is not None:
        cfg.model.backbone.reduction = copy.deepcopy(reduction)
    cfg.model.backbone.init_cfg = None
    return cfg


def train(cfg, log=print) -> tuple[str, dict | None]:
    """Train ``cfg`` with mmengine's Runner unless its final checkpoint exists; returns the
    checkpoint's path and ``seconds``, ``iters`` and ``s_per_iter`` of the training (None if the
    checkpoint existed)."""
    from mmengine.runner import Runner

    from ..models.preflight import PreflightError, check_config

    iters = cfg.train_cfg["max_iters"]
    ckpt = osp.join(cfg.work_dir, f"iter_{iters}.pth")
    if osp.isfile(ckpt):
        return ckpt, None
    try:
        check_config(cfg, train=True)
    except PreflightError as err:
        raise StudyError(str(err)) from None
    t0 = time.perf_counter()
    runner = Runner.from_cfg(cfg)
    runner.train()
    scalars = osp.join(runner.log_dir, "vis_data", "scalars.json")
    del runner
    gc.collect()
    seconds = time.perf_counter() - t0
    if not osp.isfile(ckpt):
        raise StudyError(f"training finished without writing {ckpt}")
    log(f"trained {osp.basename(cfg.work_dir)}: {iters} iterations in {seconds:.0f} s")
    return ckpt, dict(seconds=seconds, iters=iters, s_per_iter=iteration_time(scalars))


def build_model(cfg, checkpoint: str | None):
    """The segmentor of ``cfg`` in eval mode, ``checkpoint`` loaded strictly but for the
    reduction's own parameters (a baseline's checkpoint lacks them; their init is the identity)."""
    from mmseg.registry import MODELS

    from ..models.convert import FATR_ONLY, CheckpointError, load_checkpoint_file, load_state_strict

    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        try:
            state = load_checkpoint_file(checkpoint)
            load_state_strict(model, state, checkpoint, "the segmentor", optional=FATR_ONLY)
        except CheckpointError as err:
            raise StudyError(str(err)) from None
    return model.eval()


def val_dataset(cfg):
    """The validation split with the config's test pipeline (whole native images)."""
    from mmseg.registry import DATASETS

    return DATASETS.build(cfg.val_dataloader.dataset)


@torch.no_grad()
def evaluate(model, dataset) -> dict:
    """mIoU and aAcc (%), per-class ``IoU`` (None for a class absent from labels and
    predictions) and ``images`` of ``model`` on ``dataset``, with mmseg's IoUMetric."""
    from mmengine.dataset import pseudo_collate
    from mmseg.evaluation import IoUMetric

    metric = IoUMetric(iou_metrics=["mIoU"], prefix="val")
    metric.dataset_meta = dataset.metainfo
    for i in range(len(dataset)):
        batch = pseudo_collate([dataset[i]])
        metric.process(batch, [o.to_dict() for o in model.test_step(batch)])
    # As IoUMetric.compute_metrics, which returns the class mean only.
    inter, union, pred, label = (sum(parts) for parts in zip(*metric.results))
    ret = IoUMetric.total_area_to_metrics(inter, union, pred, label, ["mIoU"])
    iou = np.asarray(ret["IoU"], dtype=np.float64) * 100
    return dict(
        mIoU=float(np.nanmean(iou)),
        aAcc=float(ret["aAcc"]) * 100,
        IoU=[None if np.isnan(v) else float(v) for v in iou],
        images=len(dataset),
    )


@torch.no_grad()
def val_inputs(cfg, count: int) -> torch.Tensor:
    """The first ``count`` validation images (repeated if fewer) as the model sees them at test
    time: normalised and padded to whole patches (360x480 -> 368x480), (count, 3, H, W)."""
    from mmengine.dataset import pseudo_collate
    from mmseg.registry import MODELS

    dataset = val_dataset(cfg)
    preprocessor = MODELS.build(cfg.model.data_preprocessor)
    samples = [dataset[i % len(dataset)] for i in range(count)]
    return preprocessor(pseudo_collate(samples), False)["inputs"]


def cost(models: dict, inputs: torch.Tensor, img_shape, args) -> dict:
    """Backbone and segmentor MACs (one padded image) and images/s at the images' own size
    ``img_shape`` of ``models`` (name -> segmentor), batches ``args.bench_batches``, all
    alternating, ``args.bench_rounds`` rounds on ``args.bench_threads`` threads: ``models``,
    ``macs``, ``images_per_s`` (``b{batch}`` -> name -> median, quartiles and IQR)."""
    from .benchmark_models import forward_fn, segmentor_macs
    from .timing import TimingStats, time_alternating

    macs = {n: {t: r.macs for t, r in segmentor_macs(m, inputs[:1]).items()}
            for n, m in models.items()}  # fmt: skip
    x = inputs[..., : img_shape[0], : img_shape[1]]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.bench_threads)
    ips = {}
    try:
        for b in args.bench_batches:
            xb = x[torch.arange(b) % x.shape[0]].contiguous()
            fns = {n: forward_fn(m, "segmentor", xb, "float32") for n, m in models.items()}
            times = time_alternating(fns, iters=args.bench_rounds, warmup=1)
            ips[f"b{b}"] = {n: TimingStats.from_times(t).throughput(b) for n, t in times.items()}
    finally:
        torch.set_num_threads(threads)
    return dict(models=list(models), macs=macs, images_per_s=ips)
