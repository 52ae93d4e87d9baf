"""CamVid in the product: ``CamVidDataset``, ``LoadCamVidAnnotations``, the two configs, preflight.

Hand-made images and labels are written into ``tmp_path``; the references are the arrays written
(void 11 -> 255 by numpy) and an IoU computed by numpy over the non-void pixels. The real-data
checks read CamVid from the shared folder (see ``tests/camvid_data.py``) and skip without it.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from camvid_data import REAL_CAMVID, REAL_VIT_TI, REPO, SHARED_HINT, write_camvid
from mmseg.evaluation import IoUMetric
from mmseg.registry import DATASETS, MODELS
from mmseg.utils import register_all_modules
from PIL import Image
from tiny_configs import load_config
from torch.testing import assert_close

from fatr_seg.layers import REDUCTION_DEFAULTS, ReductionConfig
from fatr_seg.models import CamVidDataset, FATRViT
from fatr_seg.models.preflight import PreflightError, check_config_paths

register_all_modules()
CONFIGS = REPO / "configs" / "camvid"
BASELINE, FATR = "segmenter_vit-t_camvid.py", "fatr_vit-t_camvid.py"
# SegNet's 11 CamVid classes and colours, written out independently of the package.
SEGNET = {
    "Sky": (128, 128, 128), "Building": (128, 0, 0), "Pole": (192, 192, 128),
    "Road": (128, 64, 128), "Pavement": (60, 40, 222), "Tree": (128, 128, 0),
    "SignSymbol": (192, 128, 128), "Fence": (64, 64, 128), "Car": (64, 0, 128),
    "Pedestrian": (64, 64, 0), "Bicyclist": (0, 128, 192),
}  # fmt: skip
TEST_PIPELINE = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadCamVidAnnotations"),
    dict(type="PackSegInputs"),
]


def load(name):
    return load_config(CONFIGS / name)


def void_to_ignore(label):
    out = label.copy()
    out[label == 11] = 255
    return out


def prefix(split):
    return dict(img_path=f"images/{split}", seg_map_path=f"labels/{split}")


def camvid(root, split="train", pipeline=TEST_PIPELINE, **kwargs):
    return DATASETS.build(dict(type="CamVidDataset", data_root=str(root), pipeline=pipeline,
                               data_prefix=prefix(split), **kwargs))  # fmt: skip


def stem(sample):
    return sample["data_samples"].img_path.rsplit("/", 1)[-1].rsplit(".", 1)[0]


# ---------------------------------------------------------------------------------------------
# Dataset and annotation loader


def test_classes_and_palette_are_segnets(tmp_path):
    write_camvid(tmp_path, {"train": 1})
    meta = camvid(tmp_path).metainfo
    assert tuple(meta["classes"]) == tuple(SEGNET)
    assert [tuple(c) for c in meta["palette"]] == list(SEGNET.values())
    assert CamVidDataset.METAINFO["classes"] == tuple(SEGNET)


def test_pairs_load_with_void_mapped_to_ignore(tmp_path):
    pairs = write_camvid(tmp_path, {"train": 3})["train"]
    ds = camvid(tmp_path)
    assert len(ds) == 3
    for i in range(3):
        sample = ds[i]
        image, label = pairs[stem(sample)]
        # LoadImageFromFile gives BGR; PNG is lossless, so the pixels are the ones written.
        bgr = torch.from_numpy(image[..., ::-1].transpose(2, 0, 1).copy())
        assert torch.equal(sample["inputs"], bgr)
        gt = sample["data_samples"].gt_sem_seg.data[0].numpy()
        assert np.array_equal(gt, void_to_ignore(label))
        assert 11 not in gt and 255 in gt and set(np.unique(gt)) == set(range(11)) | {255}


def test_image_suffix_jpg_or_png_or_set(tmp_path):
    write_camvid(tmp_path / "jpg", {"train": 2}, suffix=".jpg")
    write_camvid(tmp_path / "png", {"train": 3}, suffix=".png")
    assert len(camvid(tmp_path / "jpg")) == 2  # detected
    assert len(camvid(tmp_path / "png")) == 3
    assert len(camvid(tmp_path / "png", img_suffix=".png")) == 3
    with pytest.raises(ValueError, match=r"no images ending in \.png in .*jpg/images/train"):
        camvid(tmp_path / "jpg", img_suffix=".png")
    # Both kinds in one folder: ambiguous unless img_suffix says which.
    jpg = tmp_path / "png" / "images" / "train" / "extra.jpg"
    Image.new("RGB", (8, 8)).save(jpg)
    with pytest.raises(ValueError, match=r"images ending in \['\.jpg', '\.png'\]: set img_suffix"):
        camvid(tmp_path / "png")
    assert len(camvid(tmp_path / "png", img_suffix=".png")) == 3
    (tmp_path / "empty" / "images" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no images ending in \('\.jpg', '\.png'\) in .*empty"):
        camvid(tmp_path / "empty")


@pytest.mark.parametrize("value", [12, 255])
def test_label_value_outside_0_to_11_names_file_and_value(tmp_path, value):
    pairs = write_camvid(tmp_path, {"train": 1})["train"]
    ((name, (_, label)),) = pairs.items()
    label = label.copy()
    label[5, 7] = value
    path = tmp_path / "labels" / "train" / f"{name}.png"
    Image.fromarray(label).save(path)
    with pytest.raises(ValueError) as err:
        camvid(tmp_path)[0]
    message = str(err.value)
    assert message.startswith(f"{path}: label value {value} is outside 0..11")
    assert "\n" not in message


def test_colour_label_is_rejected(tmp_path):
    write_camvid(tmp_path, {"train": 1})
    path = next((tmp_path / "labels" / "train").iterdir())
    Image.new("RGB", (48, 36), (128, 64, 128)).save(path)
    with pytest.raises(ValueError, match=rf"{path}: expected a single-channel class-index"):
        camvid(tmp_path)[0]


def test_image_without_label_is_named(tmp_path):
    write_camvid(tmp_path, {"train": 3})
    label = tmp_path / "labels" / "train" / "train_001.png"
    label.unlink()
    with pytest.raises(ValueError, match=rf"label not found: {label} \(1 of 3 images"):
        camvid(tmp_path)


@pytest.mark.parametrize("loader", ["LoadAnnotations", "mmseg.LoadAnnotations"])
def test_plain_load_annotations_is_refused(tmp_path, loader):
    write_camvid(tmp_path, {"train": 1})
    pipeline = [dict(type="LoadImageFromFile"), dict(type=loader)]
    with pytest.raises(ValueError, match="use dict\\(type='LoadCamVidAnnotations'\\)"):
        camvid(tmp_path, pipeline=pipeline)
    with pytest.raises(ValueError, match="reduce_zero_label must be False"):
        camvid(tmp_path, reduce_zero_label=True)


def numpy_miou(preds, labels):
    """mIoU (%) over the 11 classes on non-void pixels, classes absent from both skipped."""
    ious = []
    for c in range(11):
        inter = union = 0
        for pred, label in zip(preds, labels):
            valid = label != 11
            inter += np.sum((pred == c) & (label == c) & valid)
            union += np.sum(((pred == c) | (label == c)) & valid)
        if union:
            ious.append(inter / union)
    return 100 * float(np.mean(ious))


def test_miou_ignores_void(tmp_path):
    """mmseg's IoUMetric on labels from the pipeline equals a numpy IoU over non-void pixels."""
    pairs = write_camvid(tmp_path, {"val": 3}, seed=1)["val"]
    ds = camvid(tmp_path, split="val")
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = ds.metainfo
    rng = np.random.default_rng(0)
    preds, labels = [], []
    for i in range(len(ds)):
        sample = ds[i]
        label = pairs[stem(sample)][1]
        # Right on 70% of the pixels, a random class elsewhere; Sky on every void pixel.
        pred = np.where(rng.random(label.shape) < 0.7, label, rng.integers(0, 11, label.shape))
        pred[label == 11] = 0
        preds.append(pred)
        labels.append(label)
        gt = sample["data_samples"].gt_sem_seg.data
        metric.process({}, [dict(pred_sem_seg=dict(data=torch.from_numpy(pred)[None]),
                                 gt_sem_seg=dict(data=gt))])  # fmt: skip
    miou = metric.compute_metrics(metric.results)["mIoU"]
    expected = numpy_miou(preds, labels)
    assert miou == pytest.approx(expected, abs=0.006)  # IoUMetric rounds to 0.01
    # The check can fail: counting void pixels as a class (here 10) moves the mIoU.
    void_counted = numpy_miou(preds, [np.where(lb == 11, 10, lb) for lb in labels])
    assert abs(void_counted - expected) > 1.0


# ---------------------------------------------------------------------------------------------
# Configs


def build(cfg):
    cfg.model.backbone.init_cfg = None
    return MODELS.build(cfg.model).eval()


def test_configs_are_segmenter_t_without_and_with_the_default_reduction():
    base, fatr = load(BASELINE), load(FATR)
    backbone = base.model.backbone
    assert backbone.type == "FATRViT" and backbone.reduction is None
    assert (backbone.embed_dims, backbone.num_layers, backbone.num_heads, backbone.patch_size) == (
        192, 12, 3, 16)  # fmt: skip
    assert backbone.init_cfg == dict(
        type="Pretrained",
        checkpoint="pretrain/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors")  # fmt: skip
    head = base.model.decode_head
    assert head.type == "FATRSegmenterHead" and head.loss_decode.avg_non_ignore is True
    segmenter_t = dict(in_channels=192, channels=192, num_layers=2, num_heads=3, embed_dims=192,
                       num_classes=11)  # fmt: skip
    assert {k: head[k] for k in segmenter_t} == segmenter_t
    pre = base.model.data_preprocessor
    assert (pre.mean, pre.std, pre.bgr_to_rgb) == ([127.5] * 3, [127.5] * 3, True)
    assert base.model.test_cfg == dict(mode="whole")
    for loader, split in [("train", "train"), ("val", "val"), ("test", "test")]:
        dataset = base[f"{loader}_dataloader"].dataset
        assert dataset.type == "CamVidDataset" and dataset.data_root == "data/camvid"
        assert dataset.data_prefix == prefix(split)
        assert "reduce_zero_label" not in dataset
    # The FATR config is the baseline with the default reduction, on the compact path.
    assert fatr.model.backbone.reduction == dict(method="fatr_local", reduce_in_training=False)
    assert fatr.model.backbone.compact_output is True
    fatr.model.backbone.reduction, fatr.model.backbone.compact_output = None, False
    assert fatr.model == base.model
    for key in ("train_dataloader", "val_dataloader", "optim_wrapper", "param_scheduler"):
        assert fatr[key] == base[key]
    models = build(load(BASELINE)), build(load(FATR))
    assert all(isinstance(m.backbone, FATRViT) for m in models)
    assert models[0].backbone.reduction is None
    assert models[1].backbone.reduction == ReductionConfig.from_dict(REDUCTION_DEFAULTS)
    assert set(models[0].state_dict()) <= set(models[1].state_dict())


def packed_sample(root, cfg):
    """One hand-made 360x480 val image through the config's own test pipeline."""
    dataset = copy.deepcopy(cfg.val_dataloader.dataset)
    dataset.data_root = str(root)
    sample = DATASETS.build(dataset)[0]
    return dict(inputs=[sample["inputs"]], data_samples=[sample["data_samples"]])


@pytest.mark.parametrize("name", [BASELINE, FATR])
@torch.no_grad()
def test_whole_inference_at_native_size_is_690_tokens_and_aligned(tmp_path, name):
    """360x480 is padded to 368x480 (23x30 tokens); the logits are the padded image's, cropped."""
    write_camvid(tmp_path, {"val": 1}, size=(360, 480))
    cfg = load(name)
    torch.manual_seed(0)
    model = build(cfg)
    grids = []
    model.backbone.patch_embed.register_forward_hook(lambda m, i, out: grids.append(out[1]))
    data = packed_sample(tmp_path, cfg)
    out = model.test_step(copy.deepcopy(data))[0]
    assert [tuple(g) for g in grids] == [(23, 30)]
    assert out.pred_sem_seg.data.shape == (1, 360, 480)
    # Reference: normalise, pad the bottom 8 rows with the normalised pad value 0, run the
    # segmentor on 368x480, crop the logits back.
    img = data["inputs"][0].float()[[2, 1, 0]]
    x = F.pad((img - 127.5) / 127.5, (0, 0, 0, 8))[None]
    logits = model.encode_decode(x, [dict(img_shape=(368, 480), pad_shape=(368, 480))])
    assert_close(out.seg_logits.data, logits[0, :, :360], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Preflight


def pointed_at(cfg, root):
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = str(root)
    return cfg


def test_preflight_missing_root_names_it_and_the_camvid_section(tmp_path):
    missing = tmp_path / "no_camvid"
    cfg = pointed_at(load(BASELINE), missing)
    for train, first in ((True, "images/val"), (False, "images/test")):
        with pytest.raises(PreflightError) as err:
            check_config_paths(cfg, train=train)
        message = str(err.value)
        assert message.startswith(f"data directory not found: {missing}/{first}")
        assert "docs/usage.md, section 'CamVid'" in message and "\n" not in message


def test_preflight_training_needs_train_and_val_not_test(tmp_path):
    write_camvid(tmp_path / "camvid", {"train": 1, "val": 1})
    cfg = pointed_at(load(FATR), tmp_path / "camvid")
    ckpt = tmp_path / "vit.safetensors"
    cfg.model.backbone.init_cfg.checkpoint = str(ckpt)
    with pytest.raises(PreflightError, match=f"pretrained checkpoint not found: {ckpt}"):
        check_config_paths(cfg, train=True)
    ckpt.write_bytes(b"")
    check_config_paths(cfg, train=True)  # no test split: training does not read it
    with pytest.raises(PreflightError, match="camvid/images/test \\(test_dataloader; see"):
        check_config_paths(cfg, train=False)


# ---------------------------------------------------------------------------------------------
# Real CamVid (shared folder)

needs_real_camvid = pytest.mark.skipif(
    not (REAL_CAMVID / "images" / "val").is_dir(),
    reason=f"real CamVid not found at {REAL_CAMVID} ({SHARED_HINT})",
)


@needs_real_camvid
def test_real_camvid_val_through_the_config_pipeline():
    cfg = load(BASELINE)
    dataset = cfg.val_dataloader.dataset
    dataset.data_root = str(REAL_CAMVID)
    ds = DATASETS.build(dataset)
    assert len(ds) == 101 and tuple(ds.metainfo["classes"]) == tuple(SEGNET)
    void_pixels = 0
    for i in (0, 50, 100):
        sample = ds[i]
        assert sample["inputs"].shape == (3, 360, 480) and sample["inputs"].dtype == torch.uint8
        raw = np.asarray(Image.open(sample["data_samples"].seg_map_path))
        assert raw.shape == (360, 480) and raw.max() <= 11
        gt = sample["data_samples"].gt_sem_seg.data[0].numpy()
        assert np.array_equal(gt, void_to_ignore(raw))
        void_pixels += int((gt == 255).sum())
    assert void_pixels > 0  # the real labels do use void


@needs_real_camvid
@pytest.mark.skipif(not REAL_VIT_TI.is_file(), reason=f"real ViT-Ti not found at {REAL_VIT_TI}")
@torch.no_grad()
def test_real_image_through_pretrained_fatr_config():
    """The FATR config with the real weights segments a real val image at its native size."""
    cfg = load(FATR)
    cfg.model.backbone.init_cfg.checkpoint = str(REAL_VIT_TI)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    out = model.eval().test_step(packed_sample(REAL_CAMVID, cfg))[0]
    assert out.pred_sem_seg.data.shape == (1, 360, 480)
    assert torch.isfinite(out.seg_logits.data).all()
