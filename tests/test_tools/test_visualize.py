"""Token maps: the drawing functions on hand-made traces, and ``tools/visualize_tokens.py``."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fatr_seg.datasets import write_dataset
from fatr_seg.layers.vit import ReductionTrace
from fatr_seg.visualization import GROUP_COLORS, draw_token_figure, token_map, token_overlay

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py"
BASELINE_CONFIG = REPO / "configs" / "demo/segmenter_vit-t_fcn_1xb8-200_synthetic-192x192.py"


def _trace(layer, lf_window, hw=(2, 3)):
    lf = torch.tensor(lf_window).reshape(1, -1)
    kept = torch.nonzero(lf[0] < 0).reshape(1, -1)
    return ReductionTrace(layer, hw, kept, torch.zeros(kept.shape), lf, torch.zeros_like(lf))


def test_token_map_counts_and_new_joins():
    first = _trace(4, [-1, 0, -1, -1, 1, -1])
    second = _trace(7, [-1, 0, 0, -1, 1, 1])
    tm1, tm2 = token_map(first), token_map(second, previous=first)
    assert tm1.layer == 4 and tm1.num_hf == 4 and tm1.num_groups == 2 and tm1.num_patches == 6
    np.testing.assert_array_equal(tm1.joined_here, [[False, True, False], [False, True, False]])
    np.testing.assert_array_equal(tm2.group, [[-1, 0, 0], [-1, 1, 1]])
    # Only the patches that joined at this layer are "new"; the earlier ones are not.
    np.testing.assert_array_equal(tm2.joined_here, [[False, False, True], [False, False, True]])


def test_overlay_tints_joined_patches_only():
    p = 4
    image = np.full((2 * p, 3 * p - 2, 3), 100, np.uint8)  # width not a multiple of the patch
    prev = _trace(4, [-1, 0, -1, -1, -1, -1])
    tm = token_map(_trace(7, [-1, 0, -1, -1, 1, -1]), previous=prev)
    out = token_overlay(image, tm, p, alpha=0.8)
    assert out.shape == image.shape and out.dtype == np.uint8
    hf = token_map(_trace(7, [-1, 0, -1, -1, 1, -1])).group < 0
    for r in range(2):
        for c in range(3):
            block = out[r * p : (r + 1) * p, c * p : (c + 1) * p]
            if hf[r, c]:
                assert (block == 100).all(), (r, c)
    # Patch (0, 1) joined token 0 earlier: full alpha towards its colour.
    expect_old = np.rint(100 * 0.2 + GROUP_COLORS[0] * 0.8)
    np.testing.assert_array_equal(out[0, p], expect_old)
    # Patch (1, 1) joined token 1 at this layer: the lighter tint (0.7 · alpha).
    a = 0.7 * 0.8
    expect_new = np.rint(100 * (1 - a) + GROUP_COLORS[1].astype(np.float64) * a)
    np.testing.assert_array_equal(out[p, p], expect_new)


def test_overlay_rejects_grey_image():
    tm = token_map(_trace(4, [-1, 0, -1, -1, 1, -1]))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        token_overlay(np.zeros((8, 12), np.uint8), tm, 4)


def test_overlay_rejects_image_larger_than_grid():
    tm = token_map(_trace(4, [-1, 0, -1, -1, 1, -1]))  # 2x3 patches
    with pytest.raises(ValueError, match="2x3 grid of 4-px patches does not cover the 9x12"):
        token_overlay(np.zeros((9, 12, 3), np.uint8), tm, 4)


@pytest.mark.parametrize(
    "shape, patch, panel", [((384, 480), 192, (480, 384)), ((64, 96), 32, (320, 213))]
)
def test_figure_size(tmp_path, shape, patch, panel):
    image = np.zeros((*shape, 3), np.uint8)
    tm = token_map(_trace(4, [-1, 0, -1, -1, 1, -1]))
    out = tmp_path / "fig.png"
    draw_token_figure(image, [tm], patch, [("other", image)], "title", out_file=str(out), dpi=100)
    with Image.open(out) as png:
        assert png.format == "PNG"
        # Two panels, 1:1 from 320 px wide up, enlarged below; 0.35 + 0.3 + 0.45 inches of text.
        assert png.size == (2 * panel[0], panel[1] + 110)


def _load_tool():
    spec = importlib.util.spec_from_file_location("visualize_tokens", REPO / "tools" /
                                                  "visualize_tokens.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis") / "data"
    write_dataset(root, num_train=1, num_val=2, size=96, seed=0, progress=False)
    return root


def _options(root):
    return [f"{k}.dataset.data_root={root}" for k in ("val_dataloader", "test_dataloader")]


@pytest.mark.slow
def test_visualize_tool_warns_of_random_weights_and_rejects_plain_vit(tiny_data, tmp_path, capsys):
    """The PNGs it writes (names, panels, sizes) are checked on the demo's run of the tool
    (``test_demo.py::test_quick_demo_end_to_end``)."""
    tool = _load_tool()
    with pytest.raises(SystemExit, match="no token reduction"):
        tool.main([str(BASELINE_CONFIG), "--out-dir", str(tmp_path), "--cfg-options",
                   *_options(tiny_data)])  # fmt: skip
    assert "RANDOM weights" in capsys.readouterr().out


def test_visualize_tool_missing_checkpoint(tmp_path):
    tool = _load_tool()
    with pytest.raises(SystemExit, match="checkpoint not found"):
        tool.main([str(DEMO_CONFIG), "--checkpoint", str(tmp_path / "none.pth")])
