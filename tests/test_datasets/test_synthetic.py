"""The synthetic ADE20K-layout generator: determinism, labels, texture design, layout, mmseg."""

import json

import numpy as np
import pytest
from PIL import Image

from fatr_seg.datasets import CLASSES, PALETTE, generate_sample, write_dataset
from fatr_seg.datasets.synthetic import (
    BACKGROUND,
    BLOB,
    IGNORE,
    LINE,
    MARKER,
    TEXTURES,
    is_complete,
    sample_rng,
)

K = len(CLASSES)


def _samples(count, size=128, seed=0):
    return [generate_sample(sample_rng(seed, "training", i), size) for i in range(1, count + 1)]


def _interior(label, cls):
    """Pixels of ``cls`` whose 4-neighbours are ``cls`` too, so differences stay inside it."""
    mask = label == cls
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    return inner


def test_metadata_lists():
    assert len(CLASSES) == len(PALETTE) == K
    assert len(set(CLASSES)) == K
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE)
    assert CLASSES[BACKGROUND - 1] == "background"
    assert CLASSES[LINE - 1] == "line" and CLASSES[BLOB - 1] == "blob"


def test_shapes_and_dtypes():
    image, label = generate_sample(np.random.default_rng(0), (48, 80))
    assert image.shape == (48, 80, 3) and image.dtype == np.uint8
    assert label.shape == (48, 80) and label.dtype == np.uint8
    image, label = generate_sample(np.random.default_rng(0), 32)
    assert image.shape == (32, 32, 3) and label.shape == (32, 32)


def test_same_seed_is_identical_and_other_seed_differs():
    a_img, a_lab = generate_sample(sample_rng(3, "training", 5), 64)
    b_img, b_lab = generate_sample(sample_rng(3, "training", 5), 64)
    assert a_img.tobytes() == b_img.tobytes() and a_lab.tobytes() == b_lab.tobytes()
    for other in (sample_rng(4, "training", 5), sample_rng(3, "validation", 5)):
        c_img, _ = generate_sample(other, 64)
        assert not np.array_equal(a_img, c_img)
    d_img, _ = generate_sample(sample_rng(3, "training", 6), 64)
    assert not np.array_equal(a_img, d_img)


def test_label_values_and_class_coverage():
    seen = np.zeros(K + 1, bool)
    ignore_fraction = []
    for _, label in _samples(24):
        assert label.max() <= K
        seen |= np.bincount(label.ravel(), minlength=K + 1) > 0
        ignore_fraction.append(np.mean(label == IGNORE))
    assert seen.all(), f"classes never drawn: {np.flatnonzero(~seen)}"
    # Region borders are ignored, but only a thin band of them.
    assert 0.002 < np.mean(ignore_fraction) < 0.1


def test_texture_classes_share_mean_colour():
    """A low-pass model must not be able to tell the textures apart by colour."""
    deviations = {c: [] for c in TEXTURES}
    for image, label in _samples(40):
        textured = np.isin(label, TEXTURES)
        if not textured.any():
            continue
        image_mean = image[textured].mean(axis=0)
        for c in TEXTURES:
            mask = label == c
            if mask.sum() >= 800:  # large enough for the pattern to average out
                deviations[c].append(image[mask].mean(axis=0) - image_mean)
    for c, devs in deviations.items():
        assert len(devs) >= 5, f"{CLASSES[c - 1]} too rare to check"
        devs = np.abs(np.array(devs))
        assert devs.max() < 8, f"{CLASSES[c - 1]} region mean is off by {devs.max():.1f}"
        assert devs.mean() < 2, f"{CLASSES[c - 1]} mean is off by {devs.mean():.1f} on average"


def test_textures_differ_in_high_frequencies():
    """What separates the textures is in neighbouring-pixel differences, e.g. stripe direction."""
    classes = (BACKGROUND, *TEXTURES)
    total = {c: np.zeros(2) for c in classes}  # sum of |d/dy|, |d/dx| over interior pixels
    count = dict.fromkeys(classes, 0)
    for image, label in _samples(24):
        grey = image.astype(np.float32).mean(axis=2)
        dy = np.abs(np.diff(grey, axis=0, append=grey[-1:]))
        dx = np.abs(np.diff(grey, axis=1, append=grey[:, -1:]))
        for c in classes:
            inner = _interior(label, c)
            total[c] += [dy[inner].sum(), dx[inner].sum()]
            count[c] += inner.sum()
    mean = {c: total[c] / count[c] for c in classes}
    h, v = CLASSES.index("stripes_fine_h") + 1, CLASSES.index("stripes_fine_v") + 1
    assert mean[h][0] > 3 * mean[h][1]
    assert mean[v][1] > 3 * mean[v][0]
    for c in TEXTURES:
        assert mean[c].sum() > 5 * mean[BACKGROUND].sum(), CLASSES[c - 1]


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_write_dataset_layout(tmp_path):
    counts = write_dataset(tmp_path, num_train=3, num_val=2, size=(40, 56), seed=1, progress=False)
    assert counts == {"training": 3, "validation": 2}
    expected = [
        *(f"annotations/training/ADE_train_{i:08d}.png" for i in (1, 2, 3)),
        *(f"annotations/validation/ADE_val_{i:08d}.png" for i in (1, 2)),
        MARKER,
        *(f"images/training/ADE_train_{i:08d}.jpg" for i in (1, 2, 3)),
        *(f"images/validation/ADE_val_{i:08d}.jpg" for i in (1, 2)),
    ]
    assert _tree(tmp_path) == sorted(expected)

    image = Image.open(tmp_path / "images/validation/ADE_val_00000002.jpg")
    label = Image.open(tmp_path / "annotations/validation/ADE_val_00000002.png")
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (56, 40))
    assert (label.format, label.mode, label.size) == ("PNG", "L", (56, 40))
    _, expected_label = generate_sample(sample_rng(1, "validation", 2), (40, 56))
    np.testing.assert_array_equal(np.asarray(label), expected_label)

    marker = json.loads((tmp_path / MARKER).read_text())
    assert marker["seed"] == 1 and marker["size"] == [40, 56]
    assert marker["counts"] == counts and marker["classes"] == list(CLASSES)
    assert is_complete(tmp_path, 3, 2, (40, 56), 1)
    assert not is_complete(tmp_path, 3, 2, (40, 56), 2)


def test_write_dataset_skips_regenerates_and_subsets(tmp_path):
    settings = dict(size=32, seed=0, progress=False)
    write_dataset(tmp_path / "a", num_train=4, num_val=2, **settings)
    first = tmp_path / "a/images/training/ADE_train_00000001.jpg"
    stamp = first.stat().st_mtime_ns

    write_dataset(tmp_path / "a", num_train=4, num_val=2, **settings)
    assert first.stat().st_mtime_ns == stamp, "a complete dataset was regenerated"

    # A smaller regeneration leaves no stale samples behind.
    write_dataset(tmp_path / "a", num_train=2, num_val=1, **settings)
    assert len(_tree(tmp_path / "a")) == 2 * (2 + 1) + 1

    # Each file depends only on (seed, split, index): a subset is byte-identical.
    write_dataset(tmp_path / "b", num_train=2, num_val=1, **settings)
    for name in _tree(tmp_path / "b"):
        if name != MARKER:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_progress_without_tqdm(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    write_dataset(tmp_path, num_train=2, num_val=1, size=16, progress=True)
    assert "3/3 images" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_ade")
    write_dataset(root, num_train=4, num_val=8, size=64, seed=0, progress=False)
    return root


# The ADE20K test pipeline (mmseg::_base_/datasets/ade20k.py).
TEST_PIPELINE = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(2048, 512), keep_ratio=True),
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="PackSegInputs"),
]


def _check_gt(dataset, num_samples, size=64):
    assert len(dataset) == num_samples
    seen = set()
    for i in range(len(dataset)):
        sample = dataset[i]
        assert tuple(sample["inputs"].shape[-2:]) == (512, 512)  # Resize keeps the ratio
        gt = sample["data_samples"].gt_sem_seg.data.numpy()
        assert gt.shape == (1, size, size)  # annotations are loaded after Resize, as in ADE20K
        seen |= set(np.unique(gt).tolist())
    assert seen <= set(range(K)) | {255}
    assert 255 in seen and len(seen - {255}) > K // 2


def _mmseg_dataset(name, root, **kwargs):
    """mmseg's dataset class ``name`` on the validation split of ``root``, test pipeline."""
    mmseg_datasets = pytest.importorskip("mmseg.datasets")
    from mmseg.utils import register_all_modules

    register_all_modules()
    prefix = dict(img_path="images/validation", seg_map_path="annotations/validation")
    return getattr(mmseg_datasets, name)(data_root=str(root), data_prefix=prefix,
                                         pipeline=TEST_PIPELINE, **kwargs)  # fmt: skip


def test_mmseg_ade20k_dataset_reads_it(tiny_set):
    _check_gt(_mmseg_dataset("ADE20KDataset", tiny_set), 8)


def test_mmseg_dataset_with_our_metainfo(tiny_set):
    """Our class names with the ADE20K file convention and ``reduce_zero_label``.

    ``ADE20KDataset`` itself rejects ``metainfo`` classes that are not a subset of its 150 names
    (``BaseSegDataset.get_label_map``), so configs that want our names use ``BaseSegDataset`` with
    ADE20K's suffixes.
    """
    dataset = _mmseg_dataset("BaseSegDataset", tiny_set, img_suffix=".jpg", seg_map_suffix=".png",
                             reduce_zero_label=True,
                             metainfo=dict(classes=CLASSES, palette=PALETTE))  # fmt: skip
    assert tuple(dataset.metainfo["classes"]) == CLASSES
    assert [list(c) for c in dataset.metainfo["palette"]] == PALETTE
    assert dataset.label_map is None
    _check_gt(dataset, 8)
