"""Draw which patches each reduction layer kept as HF tokens and which token the rest joined.

``python tools/visualize_tokens.py CONFIG [--checkpoint CKPT] [--img IMG] [--out-dir DIR]``

Writes ``tokens_block{L}.png`` per reduction layer (token map over the image, next to the predicted
segmentation drawn by mmseg's ``SegLocalVisualizer`` and, when the image has an annotation, the
ground truth) and ``tokens_overview.png`` (all layers, the prediction and the ground truth in one
row). Patches that joined another token are tinted by group; one small legend says what the tints
mean. Works for any config with a reduction (ADE20K, the demo's, CamVid's). Without ``--img``
the first validation image of the config's dataset is used, or one generated in memory when that
is absent. Without ``--checkpoint`` the weights are random (a warning says so).
"""

import argparse
import glob
import os
import os.path as osp
import sys
import warnings

# mmengine and mmcv import pkg_resources (hence setuptools < 81); its deprecation notice is noise.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import numpy as np
from mmengine.config import Config, DictAction

from fatr_seg.visualization import draw_token_figure, panel_title, token_map


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Draw FATR token maps for one image")
    parser.add_argument("config", help="model config (with a reduction)")
    parser.add_argument("--checkpoint", help="trained checkpoint; random weights if omitted")
    parser.add_argument("--img", help="image file; default: first validation image of the config")
    parser.add_argument("--out-dir", default="work_dirs/token_maps", help="where the PNGs go")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config settings")  # fmt: skip
    return parser.parse_args(argv)


def _dataset_cfgs(cfg):
    """The datasets of the test and the validation loader (CamVid's test split may be absent)."""
    out = []
    for name in ("test_dataloader", "val_dataloader"):
        dataset = (cfg.get(name) or {}).get("dataset") or {}
        while "dataset" in dataset:  # RepeatDataset and friends
            dataset = dataset["dataset"]
        out.append(dataset)
    return out


def _dirs(dataset):
    root, prefix = dataset.get("data_root", "") or "", dataset.get("data_prefix") or {}
    return tuple(osp.join(root, prefix.get(k, "")) for k in ("img_path", "seg_map_path"))


def default_image(cfg):
    """``(path or None, RGB image, label or None)``: the first image of the test split, else of
    the validation split.

    The label is in the training convention (``reduce_zero_label`` applied). Falls back to one
    synthetic validation image generated in memory when no dataset folder has images.
    """
    for dataset in _dataset_cfgs(cfg):
        img_dir = _dirs(dataset)[0]
        suffix = dataset.get("img_suffix", ".jpg")
        files = sorted(glob.glob(osp.join(img_dir, f"*{suffix}"))) if osp.isdir(img_dir) else []
        if files:
            return files[0], None, None
    from fatr_seg.datasets.synthetic import generate_sample, sample_rng

    print("no dataset images: drawing on a generated synthetic validation image")
    image, label = generate_sample(sample_rng(0, "validation", 1), (384, 384))
    label = label.astype(np.int64) - 1
    label[label < 0] = 255
    return None, image, label


def find_annotation(cfg, img_path):
    """The label map of a test or validation image, loaded by the config's own annotation loader
    (``LoadAnnotations``; CamVid's ``LoadCamVidAnnotations`` maps void to 255), or None."""
    from mmseg.registry import TRANSFORMS

    for dataset in _dataset_cfgs(cfg):
        img_dir, seg_dir = _dirs(dataset)
        if osp.abspath(osp.dirname(img_path)) != osp.abspath(img_dir):
            continue
        stem = osp.splitext(osp.basename(img_path))[0]
        seg_path = osp.join(seg_dir, stem + dataset.get("seg_map_suffix", ".png"))
        loads = [s for s in cfg.test_pipeline if s.get("type", "").endswith("Annotations")]
        if not osp.isfile(seg_path) or not loads:
            return None
        results = dict(seg_map_path=seg_path, seg_fields=[],
                       reduce_zero_label=dataset.get("reduce_zero_label", False))  # fmt: skip
        return TRANSFORMS.build(dict(loads[0])).transform(results)["gt_seg_map"].astype(np.int64)
    return None


def dataset_meta(cfg, model):
    meta = getattr(model, "dataset_meta", None)
    if meta and meta.get("classes"):
        return meta
    metainfo = _dataset_cfgs(cfg)[0].get("metainfo") or {}
    num_classes = model.decode_head.num_classes
    classes = list(metainfo.get("classes") or [f"class {i}" for i in range(num_classes)])
    palette = metainfo.get("palette")
    if not palette:
        rng = np.random.default_rng(0)
        palette = rng.integers(0, 256, size=(len(classes), 3)).tolist()
    return dict(classes=classes, palette=[list(map(int, c)) for c in palette])


def run_model(model, cfg, image_rgb):
    """Preprocess like the test pipeline, run the segmentor and the backbone's reduction trace.

    Returns:
        ``(model input as RGB uint8 (H, W, 3), SegDataSample with pred_sem_seg, traces)``.
    """
    import torch
    from mmengine.dataset import Compose

    # Annotations are read apart (find_annotation): LoadAnnotations, CamVid's LoadCamVidAnnotations.
    steps = [dict(s) for s in cfg.test_pipeline if not s.get("type", "").endswith("Annotations")]
    steps[0] = dict(type="LoadImageFromNDArray")
    data = Compose(steps)(dict(img=np.ascontiguousarray(image_rgb[..., ::-1])))  # BGR, like mmcv
    batch = dict(inputs=[data["inputs"]], data_samples=[data["data_samples"]])
    with torch.no_grad():
        batch = model.data_preprocessor(batch, False)
        result = model.predict(batch["inputs"], batch["data_samples"])[0]
        traces = model.backbone.reduction_trace(batch["inputs"])
    shown = data["inputs"].permute(1, 2, 0).numpy()[..., ::-1]  # CHW BGR -> HWC RGB
    return np.ascontiguousarray(shown), result, traces


def seg_panel(visualizer, name, image_rgb, seg, key):
    """Draw a label map (H, W) with ``SegLocalVisualizer``; returns an RGB array."""
    import torch
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    sample = SegDataSample()
    setattr(sample, key, PixelData(data=torch.as_tensor(seg)[None]))
    visualizer.add_datasample(
        name, image_rgb, sample, draw_gt=key == "gt_sem_seg", draw_pred=key == "pred_sem_seg",
        with_labels=False,
    )  # fmt: skip
    return visualizer.get_image()


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.config):
        sys.exit(f"error: config not found: {args.config}")
    if args.checkpoint and not osp.isfile(args.checkpoint):
        sys.exit(f"error: checkpoint not found: {args.checkpoint}")
    if args.img and not osp.isfile(args.img):
        sys.exit(f"error: image not found: {args.img}")

    from mmseg.apis import init_model
    from mmseg.visualization import SegLocalVisualizer

    from fatr_seg.layers.vit import FATRVisionTransformer
    from fatr_seg.models import allow_mmengine_checkpoints  # also registers FATRViT

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if not args.checkpoint:
        print("warning: no --checkpoint given: the token maps show a model with RANDOM weights")
    allow_mmengine_checkpoints()  # init_model reads a Runner checkpoint with torch.load
    model = init_model(cfg, args.checkpoint, device=args.device)
    if not isinstance(model.backbone, FATRVisionTransformer):
        sys.exit(f"error: backbone {type(model.backbone).__name__} is not a FATRViT")
    if model.backbone.reduction is None:
        sys.exit(f"error: {args.config} has no token reduction (reduction=None): nothing to draw")

    label = None
    if args.img:
        from PIL import Image

        img_path, image = args.img, np.asarray(Image.open(args.img).convert("RGB"))
    else:
        img_path, image, label = default_image(cfg)
        if image is None:
            from PIL import Image

            image = np.asarray(Image.open(img_path).convert("RGB"))
    if label is None and img_path is not None:
        label = find_annotation(cfg, img_path)

    shown, result, traces = run_model(model, cfg, image)
    tmaps = [token_map(t, traces[i - 1] if i else None) for i, t in enumerate(traces)]

    visualizer = SegLocalVisualizer(name=f"fatr_tokens_{os.getpid()}", alpha=0.7)
    visualizer.dataset_meta = dataset_meta(cfg, model)
    panels = [("prediction", seg_panel(visualizer, "pred", image, result.pred_sem_seg.data[0],
                                        "pred_sem_seg"))]  # fmt: skip
    if label is not None and label.shape == image.shape[:2]:
        panels.append(("ground truth", seg_panel(visualizer, "gt", image, label, "gt_sem_seg")))

    os.makedirs(args.out_dir, exist_ok=True)
    name = osp.basename(img_path) if img_path else "generated validation image"
    weights = osp.basename(args.checkpoint) if args.checkpoint else "random weights"
    patch = model.backbone.patch_size
    written = []
    for tm in tmaps:
        out = osp.join(args.out_dir, f"tokens_block{tm.layer}.png")
        draw_token_figure(shown, [tm], patch, panels, f"{name} ({weights})", out_file=out)
        written.append(out)
    out = osp.join(args.out_dir, "tokens_overview.png")
    draw_token_figure(shown, tmaps, patch, panels, f"{name} ({weights})", out_file=out)
    written.append(out)
    for tm in tmaps:
        print(panel_title(tm).replace("\n", ", "))
    print("wrote " + ", ".join(written))
    return written


if __name__ == "__main__":
    main()
