"""The CamVid study behind ``tools/camvid_study.py``: every reducer on a real pretrained ViT-Ti.

:func:`run_camvid_study` runs, or resumes (every result is saved in ``results.json`` as soon as
it exists), these steps: (1) each method's budget, matched to the reference's backbone MACs at
368x480; (2) the unreduced baseline trained from ImageNet weights; (3) every method training-free
on its weights; (4) MACs and images/s of whole-image inference, all methods alternating; (5) the
HF amplitude per block; (6) every method fine-tuned by self-distillation per seed, and/or applied
to the unreduced model's fine-tuned weights. See docs/study.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import os.path as osp

import torch

from .. import REPO_ROOT
from ..layers.config import PRESETS as REDUCTION_PRESETS
from ..layers.config import ReductionConfig
from .budget import ViTShape, match_budget, with_budget
from .camvid_runs import (
    StudyError,
    baseline_cfg,
    build_model,
    cost,
    evaluate,
    finetune_cfg,
    load_cfg,
    model_cfg,
    train,
    val_dataset,
    val_inputs,
)
from .rank_collapse import diagnostics
from .store import Store, cached, log

__all__ = ["FINETUNE_AS", "METHODS", "PRESETS", "SkipStudy", "resolve_args", "run_camvid_study",
           "shared_root"]  # fmt: skip

#: Every method the study knows, in its default order; ``none`` is the unreduced model.
METHODS = ("none", "fatr", "fatr_local", "fatr_paper", "tome", "tome_constant", "algm", "evit",
           "random")  # fmt: skip
assert set(METHODS[1:]) == set(REDUCTION_PRESETS), "a reduction preset is missing from METHODS"
#: ``--finetune-as``: which fine-tunings step 6 runs (see :func:`run_camvid_study`).
FINETUNE_AS = {"own": ("own",), "unreduced": ("unreduced",), "both": ("own", "unreduced")}
EVAL_SIZE = (368, 480)  # CamVid's 360x480 padded to whole 16-pixel patches: 23x30 tokens

# ``default``: the full study; ``quick``: a CI smoke test on a few real images (about 2 min).
PRESETS = {
    "default": dict(
        base_iters=1000, batch_size=8, crop_size=256, warmup_iters=100, ft_iters=200,
        seeds=[0, 1, 2], methods=list(METHODS), train_images=0, val_images=0, workers=1,
        hf_images=8, bench_rounds=5, bench_batches=[1, 8],
    ),
    "quick": dict(
        base_iters=2, batch_size=2, crop_size=128, warmup_iters=1, ft_iters=2,
        seeds=[0], methods=["none", "fatr", "tome"], train_images=4, val_images=2, workers=0,
        hf_images=2, bench_rounds=1, bench_batches=[1, 2],
    ),
}  # fmt: skip
QUICK_WEIGHTS = "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
# Options that do not change any result: a re-run may change them. The last five are the retired
# budget curve's, which results.json files written before it still hold.
_NOT_SETTINGS = ("work_dir", "seeds", "methods", "variants", "finetune", "finetune_as", "threads",
                 "quick", "budget_curve", "curve_seeds", "budget_range", "budget_anchors",
                 "curve_fixed_ratio")  # fmt: skip


class SkipStudy(StudyError):
    """``--quick`` without the shared real data: nothing to run."""


def shared_root() -> str:
    """The shared real data and weights: ``$FATR_SHARED``, else ``../shared`` beside the
    repository."""
    return os.environ.get("FATR_SHARED", osp.join(osp.dirname(REPO_ROOT), "shared"))


def resolve_args(args):
    """Fill ``args``'s unset options from the preset and check them (a :class:`StudyError`
    names a wrong option or missing path); returns ``args``."""
    preset = PRESETS["quick" if args.quick else "default"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    shared = []  # defaults of --quick taken from the shared folder
    if args.data_root is None and args.quick:
        args.data_root = osp.join(shared_root(), "data", "camvid")
        shared.append(args.data_root)
    elif args.data_root is None:
        args.data_root = load_cfg(args.baseline_config).data_root
    if args.pretrained is None and args.quick:
        args.pretrained = osp.join(shared_root(), "weights", QUICK_WEIGHTS)
        shared.append(args.pretrained)
    missing = [p for p in shared if not osp.exists(p)]
    if missing:
        raise SkipStudy(f"--quick needs the real CamVid images and ViT-Ti weights of the shared "
                        f"folder; not found: {', '.join(missing)} (set FATR_SHARED to the folder "
                        "holding data/ and weights/)")  # fmt: skip
    for name in ("base_iters", "ft_iters", "batch_size", "crop_size", "bench_rounds"):
        if getattr(args, name) < 1:
            raise StudyError(f"--{name.replace('_', '-')} must be >= 1")
    if args.ema_momentum is None:  # an EMA horizon of a tenth of the run (see docs/study.md)
        args.ema_momentum = min(0.5, 10.0 / args.ft_iters)
    if not 0 < args.ema_momentum < 1:
        raise StudyError(f"--ema-momentum {args.ema_momentum}: must lie in (0, 1)")
    args.methods = [m for m in METHODS if m in args.methods]  # canonical order, no repeats
    args.variants = parse_variants(args.variants or [])
    args.methods += list(args.variants)
    args.seeds = sorted(set(args.seeds))
    if not osp.isdir(args.data_root):
        raise StudyError(f"CamVid data root (--data-root) not found: {args.data_root} (see "
                         "docs/usage.md, section 'CamVid')")  # fmt: skip
    if args.baseline_checkpoint and not osp.isfile(args.baseline_checkpoint):
        raise StudyError(f"--baseline-checkpoint not found: {args.baseline_checkpoint}")
    return args


def parse_variants(specs: list[str]) -> dict[str, dict]:
    """``NAME=JSON`` reduction dicts by name (:class:`StudyError`: no ``=``, a taken name,
    invalid JSON or reduction)."""
    out = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name or name in METHODS or name in out:
            raise StudyError(f"--variants {spec!r}: give NAME=JSON with a new name (not one of "
                             f"{METHODS} or an earlier variant)")  # fmt: skip
        try:
            red = json.loads(text)
            ReductionConfig.from_dict(red)
        except (json.JSONDecodeError, ValueError) as err:
            raise StudyError(f"--variants {name}: {err}") from None
        out[name] = red
    return out


@dataclasses.dataclass
class _Ctx:
    args: object
    store: Store
    runs_dir: str
    baseline: str = ""
    dataset: object = None
    shape: ViTShape | None = None


def _resolved(reduction: dict | None) -> dict | None:
    """``reduction`` with every key its preset fills, JSON-ready (tuples as lists)."""
    if reduction is None:
        return None
    return json.loads(json.dumps(dataclasses.asdict(ReductionConfig.from_dict(reduction))))


def _vit_shape(cfg) -> ViTShape:
    bb = cfg.model.backbone
    if "embed_dims" not in bb:  # a backbone whose shape its model name sets (TimmFATRViT)
        from mmseg.registry import MODELS

        vit = MODELS.build({**bb, "init_cfg": None, "checkpoint": None})
        heads = vit.blocks[0].attn.num_heads
        hidden = vit.blocks[0].mlp.fc1.out_features
        bb = dict(patch_size=vit.patch_size, embed_dims=vit.embed_dims, num_heads=heads,
                  num_layers=vit.num_layers, mlp_ratio=hidden / vit.embed_dims)  # fmt: skip
    p = bb.get("patch_size", 16)
    grid = (math.ceil(EVAL_SIZE[0] / p), math.ceil(EVAL_SIZE[1] / p))
    return ViTShape(grid, bb["embed_dims"], bb.get("num_layers", 12), p, bb["num_heads"],
                    bb.get("mlp_ratio", 4.0))  # fmt: skip


def budgets(ctx: _Ctx) -> dict:
    """Each method's reduction (``none``: None); stored, and checked against a stored one."""
    args = ctx.args
    cfg = load_cfg(args.model_config)
    ref = cfg.model.backbone.reduction
    ref = None if ref is None else ref.to_dict()
    if ref is None or ReductionConfig.from_dict(ref).keep_ratio is None:
        raise StudyError(f"{args.model_config}: the reference needs a keep_ratio reduction")
    shape = _vit_shape(cfg)
    ctx.shape = shape
    target = shape.macs(ref)
    out = {}
    for m in args.methods:
        red = None if m == "none" else args.variants.get(m, dict(method=m))
        if m == ref.get("method", "fatr"):
            value = dict(reduction=ref, macs=target, target=target, rel_error=0.0)
        elif args.equal_macs and m != "none" and m not in args.variants:  # a variant: not matched
            value = match_budget(red, target, shape, args.mac_tol).to_dict()
        else:
            value = dict(reduction=red, macs=shape.macs(red), target=target)
        train_red = _train_reduction(ctx, value["reduction"])
        if train_red != value["reduction"]:
            value["train_reduction"] = train_red
        # Every key as the presets resolve it, so a changed preset is noticed too.
        value["resolved"] = _resolved(value["reduction"])
        old = ctx.store.get(f"budget/{m}")
        if old is not None and old["resolved"] != value["resolved"]:
            raise StudyError(
                f"results.json holds {m!r} with reduction {old['resolved']}, now "
                f"{value['resolved']} (the config or a preset changed): use another --work-dir"
            )
        if old is None:
            ctx.store.put(f"budget/{m}", value)
        out[m] = value["reduction"]
    log("budgets: " + ", ".join(f"{m} {r}" for m, r in out.items()))
    return out


def _done(ctx: _Ctx, *keys: str) -> bool:
    return all(ctx.store.get(k) is not None for k in keys)


def _train_reduction(ctx: _Ctx, reduction: dict | None) -> dict | None:
    """The reduction to fine-tune with: a token count ``r`` scaled from the evaluation grid to
    the training crop's (``scale_r``), so every block removes the same fraction as in evaluation
    (matched at 690 tokens, r = 36 would leave 256² crops one token after block 12)."""
    if reduction is None or "r" not in reduction or not ctx.args.scale_r:
        return reduction
    tokens = (ctx.args.crop_size // ctx.shape.patch_size) ** 2
    r = round(reduction["r"] * tokens / math.prod(ctx.shape.grid))
    return with_budget(reduction, "r", r)


def _finetuned(ctx: _Ctx, label: str, reduction, seed: int) -> str:
    """The checkpoint of run ``ft_{label}_s{seed}``, trained unless it exists."""
    name = f"ft_{label}_s{seed}"
    cfg = finetune_cfg(ctx.args, reduction, seed, osp.join(ctx.runs_dir, name), ctx.baseline)
    ckpt, info = train(cfg, log)
    if info:
        ctx.store.put(f"train/{name}", info)
    return ckpt


def _evaluated(ctx: _Ctx, key: str, reduction, ckpt: str) -> dict:
    def run():
        return evaluate(build_model(model_cfg(ctx.args, reduction), ckpt), ctx.dataset)

    return cached(ctx.store, key, run)


def _cost_stale(ctx: _Ctx, key: str, names) -> bool:
    """Whether the cost under ``key`` is missing or lacks one of ``names`` (timed together)."""
    old = ctx.store.get(key)
    return old is None or not set(names) <= set(old["models"])


def run_camvid_study(args) -> dict:
    """Run (or resume) the study; returns the content of ``results.json``."""
    from mmseg.utils import register_all_modules

    import fatr_seg.models  # noqa: F401  (registers FATRViT, CamVidDataset, the distillation)

    register_all_modules(init_default_scope=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    try:
        settings = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
        store = Store(osp.join(args.work_dir, "results.json"), settings, _NOT_SETTINGS)
    except ValueError as err:
        raise StudyError(str(err)) from None
    ctx = _Ctx(args, store, osp.join(args.work_dir, "runs"))
    reductions = budgets(ctx)

    # 2. The baseline.
    if args.baseline_checkpoint:
        ctx.baseline = args.baseline_checkpoint
    else:
        name = f"baseline_s{args.baseline_seed}"
        cfg = baseline_cfg(args, args.baseline_seed, osp.join(ctx.runs_dir, name))
        ctx.baseline, info = train(cfg, log)
        if info:
            store.put(f"train/{name}", info)
    log(f"baseline: {ctx.baseline}")
    ctx.dataset = val_dataset(model_cfg(args, None))

    # 3-5. Training-free mIoU, cost and HF amplitude, on the baseline's weights.
    inputs = val_inputs(model_cfg(args, None), max(max(args.bench_batches), args.hf_images))
    img_shape = tuple(ctx.dataset[0]["data_samples"].img_shape)
    x_hf = inputs[: args.hf_images]
    keys = [f"{step}/{m}" for m in args.methods for step in ("free", "hf/free")]
    if not _done(ctx, *keys) or _cost_stale(ctx, "cost", reductions):
        free = {m: build_model(model_cfg(args, r), ctx.baseline) for m, r in reductions.items()}
        for m, model in free.items():
            cached(store, f"free/{m}", lambda model=model: evaluate(model, ctx.dataset))
        if _cost_stale(ctx, "cost", free):  # the stored cost lacks a method: time all again
            store.data["runs"].pop("cost", None)
        cached(store, "cost", lambda: cost(free, inputs, img_shape, args))
        for m, model in free.items():
            cached(store, f"hf/free/{m}", lambda model=model: diagnostics(model, x_hf))
        del free

    # 6. Fine-tuned, per seed: each method with its own reduction in the loop ("own"), and/or
    # applied to the unreduced model's fine-tuned weights of the same seed ("unreduced").
    modes = FINETUNE_AS[args.finetune_as]
    for seed in args.seeds if args.finetune and "unreduced" in modes else ():
        ckpt = _finetuned(ctx, "none", None, seed)
        _evaluated(ctx, f"ft/none/s{seed}", None, ckpt)
        for m in args.methods:
            if m != "none":
                _evaluated(ctx, f"deploy/{m}/s{seed}", reductions[m], ckpt)
    for seed in args.seeds if args.finetune and "own" in modes else ():
        for m in args.methods:
            key, hf_key = f"ft/{m}/s{seed}", f"hf/ft/{m}"
            if _done(ctx, key, *([hf_key] if seed == args.seeds[0] else [])):
                continue
            ckpt = _finetuned(ctx, m, _train_reduction(ctx, reductions[m]), seed)
            _evaluated(ctx, key, reductions[m], ckpt)
            if seed == args.seeds[0]:
                model = build_model(model_cfg(args, reductions[m]), ckpt)
                cached(store, hf_key, lambda model=model: diagnostics(model, x_hf))

    # What this run covered (the report's rows); a later run may cover more.
    seeds = args.seeds if args.finetune else []
    store.data["settings"].update(seeds=seeds, methods=args.methods, finetune_as=modes)
    store.save()
    return store.data
