"""Segmentors, inputs and forward passes of ``tools/benchmark.py``, and its CPU memory probe (a
fresh child process per cell, ``python -m fatr_seg.analysis.benchmark_models SPEC``, so memory the
parent holds cannot hide the pass's). mmseg and mmengine are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os.path as osp
import subprocess
import sys
import time

import numpy as np
import torch

from .. import REPO_ROOT
from .flops import count_macs
from .timing import current_rss_bytes, peak_rss_bytes, peak_tensor_bytes, reset_peak_rss

__all__ = ["COMPILED", "DTYPES", "build_segmentor", "compiled_forward_fn", "config_variants",
           "forward_fn", "image_metas", "make_images", "make_labels", "memory_probe",
           "patch_tokens", "run_memory_probe", "segmentor_macs", "train_samples"]  # fmt: skip

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The tiny model of --quick: same depth and reduction layers, small width.
TINY_DIM, TINY_HEADS = 64, 2
PROBE_TAG = "FATR_MEMORY_PROBE "
COMPILED = "+compile"  # suffix of a config's compiled twin in the results
MAX_DISTINCT_IMAGES = 8  # larger batches repeat them; content only matters for token selection


def _shrink(cfg) -> None:
    """Make the model of ``cfg`` tiny (--quick): same depth and reduction, width 64."""
    bb = cfg.model.backbone
    bb.embed_dims, bb.num_heads = TINY_DIM, TINY_HEADS
    head = cfg.model.decode_head
    sizes = dict(in_channels=TINY_DIM, channels=TINY_DIM, embed_dims=TINY_DIM,
                 num_heads=TINY_HEADS, num_layers=1)  # fmt: skip
    head.update({k: v for k, v in sizes.items() if k in head})
    cfg.model.pop("auxiliary_head", None)


def build_segmentor(path: str, tiny: bool = False, cfg_options: dict | None = None,
                    keep_ratio=None):  # fmt: skip
    """``(model, cfg, (mean, std))``: the segmentor of config ``path`` without pretrained
    weights, eval mode, on CPU, and its normalisation. ``tiny``: width 64 (``--quick``);
    ``cfg_options`` merged first; ``keep_ratio``: the reduction's budget (None: the config's)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if "model" not in cfg or "backbone" not in cfg.model:
        raise ValueError(f"{path} defines no model.backbone")
    if keep_ratio is not None:
        from ..models.keep_ratio import set_config_keep_ratio

        set_config_keep_ratio(cfg, keep_ratio, path)
    cfg.model.pop("pretrained", None)
    cfg.model.backbone.init_cfg = None  # no weights here; speed does not depend on them
    if tiny:
        _shrink(cfg)
    init_default_scope(cfg.get("default_scope", "mmseg"))
    model = MODELS.build(cfg.model).eval()
    pre = cfg.model.get("data_preprocessor") or {}
    norm = (pre.get("mean", [127.5] * 3), pre.get("std", [127.5] * 3))
    return model, cfg, norm


def config_variants(paths: list[str], keep_ratios=None) -> list[tuple[str, str, tuple | None]]:
    """The models a benchmark runs: ``(name, config path, keep ratio or None)``, one per config
    (named by its file without ``.py``, ``#i`` added where two are alike), or with ``keep_ratios``
    one per budget of every config with a reduction (``NAME@keepR``). Raises ``KeepRatioError``
    when a budget does not fit a config or no config has a reduction."""
    stems = [osp.splitext(osp.basename(p))[0] for p in paths]
    names = [n if stems.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(stems)]
    if not keep_ratios:
        return [(n, p, None) for n, p in zip(names, paths)]
    from mmengine.config import Config

    from ..models.keep_ratio import (
        KeepRatioError,
        format_keep_ratio,
        reduction_layers,
        set_config_keep_ratio,
    )

    out = []
    for name, path in zip(names, paths):
        cfg = Config.fromfile(path)
        if reduction_layers(cfg) is None:
            out.append((name, path, None))
            continue
        for ratio in keep_ratios:
            ratios = set_config_keep_ratio(cfg, ratio, path)  # checks it fits this config
            out.append((f"{name}@keep{format_keep_ratio(ratio)}", path, ratios))
    if all(ratio is None for _, _, ratio in out):
        which = paths[0] if len(paths) == 1 else "none of " + ", ".join(paths)
        raise KeepRatioError(
            f"--keep-ratio {' '.join(map(format_keep_ratio, keep_ratios))}: {which} has "
            f"{'no' if len(paths) == 1 else 'a'} token reduction, so there is no budget to set"
        )
    return out


def _samples(batch: int, shape: tuple[int, int], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from ..datasets.synthetic import generate_sample

    distinct = [
        generate_sample(np.random.default_rng([seed, i]), shape)
        for i in range(min(batch, MAX_DISTINCT_IMAGES))
    ]
    return [distinct[i % len(distinct)] for i in range(batch)]


def make_images(batch: int, shape: tuple[int, int], norm, seed: int) -> torch.Tensor:
    """Normalised synthetic images (B, 3, H, W), float32, on CPU."""
    x = torch.stack(
        [torch.from_numpy(im).permute(2, 0, 1).float() for im, _ in _samples(batch, shape, seed)]
    )
    mean = torch.tensor(norm[0], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(norm[1], dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def make_labels(batch: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Label maps (B, H, W) of :func:`make_images`'s images as mmseg's ADE20K pipeline loads them
    (``reduce_zero_label``)."""
    labels = torch.stack(
        [torch.from_numpy(lab.astype(np.int64)) for _, lab in _samples(batch, shape, seed)]
    )
    return torch.where(labels == 0, 255, labels - 1)


def image_metas(batch: int, shape: tuple[int, int]) -> list[dict]:
    """The image metas ``encode_decode`` reads, for ``batch`` unpadded images of ``shape``."""
    return [dict(img_shape=shape, ori_shape=shape, pad_shape=shape) for _ in range(batch)]


def segmentor_macs(model, x: torch.Tensor, segmentor: bool = True) -> dict:
    """The :class:`~.flops.MacReport` of one image ``x`` (1, 3, H, W) through ``model.backbone``
    (key ``backbone``) and, if ``segmentor``, the whole ``encode_decode`` (key ``segmentor``)."""
    out = dict(backbone=count_macs(model.backbone, x))
    if segmentor:
        metas = image_metas(1, tuple(x.shape[2:]))
        out["segmentor"] = count_macs(model, x, metas, method="encode_decode")
    return out


def train_samples(labels: torch.Tensor) -> list:
    """mmseg ``SegDataSample`` objects holding the label maps (B, H, W) as ``gt_sem_seg``."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    shape = tuple(labels.shape[1:])
    samples = []
    for meta, label in zip(image_metas(labels.shape[0], shape), labels):
        sample = SegDataSample(metainfo=meta)
        sample.gt_sem_seg = PixelData(data=label[None])
        samples.append(sample)
    return samples


def forward_fn(model, target: str, x: torch.Tensor, dtype: str, labels=None):
    """Zero-argument callable running one pass of ``target``: ``backbone`` or ``segmentor``
    (``encode_decode``), one forward in inference mode; ``train``, one training step without the
    optimizer update (``model.loss`` on ``labels`` and its backward, in train mode)."""
    metas = image_metas(x.shape[0], tuple(x.shape[2:]))
    context = _autocast(x, dtype)

    if target == "train":
        if labels is None:
            raise ValueError("target 'train' needs labels (make_labels)")
        if tuple(labels.shape) != (x.shape[0], *x.shape[2:]):
            raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(x.shape)}")
        samples = train_samples(labels.to(x.device))

        def train_step():
            was_training = model.training
            model.train()
            try:
                model.zero_grad(set_to_none=True)
                with context():
                    losses = model.loss(x, samples)
                loss, _ = model.parse_losses(losses)
                loss.backward()
            finally:
                model.train(was_training)
            return loss.detach()

        return train_step

    def run():
        with torch.inference_mode(), context():
            if target == "backbone":
                return model.backbone(x)
            return model.encode_decode(x, metas)

    return run


def _autocast(x: torch.Tensor, dtype: str):
    """A factory of the pass's autocast context (CUDA with a low-precision dtype only)."""
    if x.is_cuda and dtype != "float32":
        return lambda: torch.autocast("cuda", DTYPES[dtype])
    return contextlib.nullcontext


def compiled_forward_fn(model, target: str, x: torch.Tensor, dtype: str):
    """:func:`forward_fn` through ``torch.compile`` and the seconds of its first (compiling)
    call: backbone, neck and decode head one graph each, as ``tools/test.py --compile`` runs them
    (the final resize eager: on CPU inductor's bilinear kernel is slower). The compiled forwards are
    installed only during a call, so the eager twin stays eager."""
    from ..models.compile import COMPILE_TARGETS

    if target not in ("backbone", "segmentor"):
        raise ValueError(f"only forward targets compile, got {target!r}")
    # Every (model, target, shape, batch) is one more graph for the same code object.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    parts = {
        name: torch.compile(getattr(model, name).forward, fullgraph=True, dynamic=False)
        for name in (COMPILE_TARGETS if target == "segmentor" else ("backbone",))
        if getattr(model, name, None) is not None
    }
    eager = forward_fn(model, target, x, dtype)

    def run():
        for name, fn in parts.items():
            getattr(model, name).forward = fn
        try:
            return eager()
        finally:
            for name in parts:
                del getattr(model, name).forward

    start = time.perf_counter()
    run()
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return run, time.perf_counter() - start


def patch_tokens(model, shape: tuple[int, int]) -> int:
    """Patch tokens of ``model``'s backbone on an input of ``shape`` (padded to whole patches)."""
    p = getattr(model.backbone, "patch_size", 16)
    p = p[0] if isinstance(p, tuple | list) else p
    return -(-shape[0] // p) * -(-shape[1] // p)


def memory_probe(spec: dict) -> dict:
    """Peak memory of one pass of ``spec``, in the child process: the peak RSS growth of a
    first pass (what the machine must have) and the peak of live tensor bytes of a second,
    profiled one (what the model needs)."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model, _, norm = build_segmentor(spec["config"], spec["tiny"],
                                     keep_ratio=spec.get("keep_ratio"))  # fmt: skip
    shape = tuple(spec["shape"])
    x = make_images(spec["batch"], shape, norm, spec["seed"])
    labels = make_labels(spec["batch"], shape, spec["seed"]) if spec["target"] == "train" else None
    run = forward_fn(model, spec["target"], x, "float32", labels)
    gc.collect()
    method = "child_vmhwm" if reset_peak_rss() else "child_maxrss"
    before = current_rss_bytes()
    run()
    peak = peak_rss_bytes()
    # A second forward, profiled: live tensor bytes, free of the allocator's retained memory.
    tensors = peak_tensor_bytes(run)
    return dict(peak_bytes=peak, before_bytes=before, forward_bytes=peak - before, method=method,
                tensor_peak_bytes=tensors)  # fmt: skip


def run_memory_probe(spec: dict, timeout: float) -> dict:
    """Run :func:`memory_probe` on ``spec`` in a fresh child process; its result or an ``error``."""
    cmd = [sys.executable, "-m", "fatr_seg.analysis.benchmark_models", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return dict(error=f"memory probe timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_TAG):
            return json.loads(line[len(PROBE_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(error=f"memory probe failed (exit {proc.returncode}): {' | '.join(tail)}")


if __name__ == "__main__":  # the child process of run_memory_probe
    import warnings

    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    print(PROBE_TAG + json.dumps(memory_probe(json.loads(sys.argv[1]))), flush=True)
