"""Drawing token maps: which patches a reduction layer kept as tokens, and where the rest went.

Pure numpy/matplotlib on top of :class:`fatr_seg.layers.vit.ReductionTrace`; no mmseg import, so
the pictures can be drawn from any ``FATRVisionTransformer``. ``tools/visualize_tokens.py`` adds the
mmseg side (config, checkpoint, predicted segmentation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "GROUP_COLORS",
    "TokenMap",
    "draw_token_figure",
    "panel_title",
    "token_map",
    "token_overlay",
]

# Colours of the tokens that patches joined (a merged-into token, a DC token, EViT's fused token),
# by group: 16, then repeated. Saturated and far from grey, so that they read on the images.
GROUP_COLORS = np.array(
    [
        [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
        [148, 103, 189], [140, 86, 75], [227, 119, 194], [23, 190, 207],
        [188, 189, 34], [127, 127, 127], [0, 0, 128], [128, 0, 0],
        [0, 128, 128], [128, 128, 0], [255, 215, 0], [0, 0, 0],
    ],
    dtype=np.uint8,
)  # fmt: skip


@dataclass(frozen=True)
class TokenMap:
    """One reduction layer's outcome for one image, on the patch grid.

    Attributes:
        layer: 1-indexed block that reduced.
        group: (H, W) int array: the token each patch joined (the kept token it merged into, a
            DC token, EViT's fused token), -1 for patches that are their own token.
        joined_here: (H, W) bool array: patches that joined a token at this layer (the other
            joined ones did at an earlier layer).
        num_groups: Tokens that hold at least one patch that joined them.
    """

    layer: int
    group: np.ndarray
    joined_here: np.ndarray
    num_groups: int

    @property
    def num_hf(self) -> int:
        return int((self.group < 0).sum())

    @property
    def num_patches(self) -> int:
        return int(self.group.size)


def token_map(trace, previous=None, index: int = 0) -> TokenMap:
    """Turn one :class:`ReductionTrace` into a :class:`TokenMap` for image ``index``.

    Args:
        trace: The layer's ``ReductionTrace`` (``group`` is (B, N), ``hw_shape`` is (H, W)).
        previous: The trace of the previous reduction layer, or None for the first one; used to
            tell patches that joined here from those that joined earlier.
        index: Image in the batch.
    """
    H, W = trace.hw_shape
    group = trace.group[index].detach().cpu().numpy().astype(np.int64).reshape(H, W)
    if previous is None:
        before = np.full_like(group, -1)
    else:
        before = previous.group[index].detach().cpu().numpy().astype(np.int64).reshape(H, W)
    joined_here = (group >= 0) & (before < 0)
    num_groups = int(np.unique(group[group >= 0]).size)
    return TokenMap(int(trace.layer), group, joined_here, num_groups)


def _upsample(grid: np.ndarray, patch_size: int, shape: tuple[int, int]) -> np.ndarray:
    """Patch grid (h, w) -> pixel map (H, W): each patch covers ``patch_size`` pixels a side.

    The backbone pads the image bottom/right to a multiple of the patch, so cropping the repeated
    grid to ``shape`` puts every patch back over the pixels it saw.
    """
    full = np.repeat(np.repeat(grid, patch_size, axis=0), patch_size, axis=1)
    return full[: shape[0], : shape[1]]


def token_overlay(
    image: np.ndarray, tmap: TokenMap, patch_size: int, alpha: float = 0.8
) -> np.ndarray:
    """Tint the patches that joined another token with its colour; kept ones stay clear.

    Patches that joined at this layer get a lighter tint than earlier ones, so the two read
    apart; the image stays faintly visible under both.

    Args:
        image: (H, W, 3) uint8 RGB image as fed to the model (before normalisation).
        tmap: The layer's :class:`TokenMap`.
        patch_size: The backbone's patch size.
        alpha: Opacity of the group colour on patches that joined earlier.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    shape = image.shape[:2]
    grid = tmap.group.shape
    if grid[0] * patch_size < shape[0] or grid[1] * patch_size < shape[1]:
        raise ValueError(
            f"a {grid[0]}x{grid[1]} grid of {patch_size}-px patches does not cover the "
            f"{shape[0]}x{shape[1]} image: is this the image the model saw?"
        )
    out = image.astype(np.float32)
    group = _upsample(tmap.group, patch_size, shape)
    here = _upsample(tmap.joined_here, patch_size, shape)
    joined = group >= 0
    color = GROUP_COLORS[np.where(joined, group, 0) % len(GROUP_COLORS)].astype(np.float32)
    a = np.where(here, 0.7 * alpha, alpha)[..., None] * joined[..., None]
    out = out * (1 - a) + color * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _kinds_legend(fig, ncols: int) -> None:
    """The small legend of what the colours mean, under the panels (never over an image)."""
    from matplotlib.patches import Patch

    color = GROUP_COLORS[0] / 255.0
    handles = [
        Patch(facecolor="white", edgecolor="black", label="kept as an HF token (untinted)"),
        Patch(facecolor=color, label="joined another token (one colour per token joined)"),
        Patch(facecolor=0.3 + 0.7 * color, label="joined at this block (lighter)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=3 if ncols > 1 else 1,
               fontsize=8, frameon=False)  # fmt: skip


def panel_title(tmap: TokenMap) -> str:
    """Two short lines: how many patches the block kept, and where the rest went."""
    joined, here = tmap.num_patches - tmap.num_hf, int(tmap.joined_here.sum())
    return (f"block {tmap.layer}: {tmap.num_hf} of {tmap.num_patches} patches kept\n"
            f"{joined} joined {tmap.num_groups} tokens ({here} at this block)")  # fmt: skip


def draw_token_figure(
    image: np.ndarray,
    tmaps: list[TokenMap],
    patch_size: int,
    panels: list[tuple[str, np.ndarray]] = (),
    title: str | None = None,
    out_file: str | None = None,
    dpi: int = 100,
    min_panel_px: int = 320,
):
    """One figure: the token map of each layer in ``tmaps``, then extra image ``panels``.

    Every panel has a title; the colours are explained by one small legend of kinds under the
    panels (no legend entry per token). Patches that joined another token are tinted with that
    token's colour (:data:`GROUP_COLORS`, by group), so the groups read apart without a key.

    Args:
        image: (H, W, 3) uint8 RGB input image.
        tmaps: Token maps to draw, one panel each.
        patch_size: The backbone's patch size.
        panels: ``(caption, (H', W', 3) uint8 RGB)`` drawn after the token maps, e.g. the
            prediction and the ground truth from mmseg's ``SegLocalVisualizer``.
        title: Figure title (wrapped to the figure's width).
        out_file: Save the figure here as PNG (and close it); None returns the open figure.
        dpi: Resolution of the saved PNG.
        min_panel_px: Smaller images are shown enlarged to this panel width, so the titles fit;
            from this width up, one image pixel is one PNG pixel.

    Returns:
        The matplotlib figure, or None when saved to ``out_file``.
    """
    import textwrap

    import matplotlib

    if out_file is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    items = [(panel_title(tm), token_overlay(image, tm, patch_size)) for tm in tmaps]
    items += list(panels)
    h, w = image.shape[:2]
    panel_w = max(w, min_panel_px)
    panel_h = round(h * panel_w / w)
    ncols = len(items)
    legend_h, title_h = 0.35, 0.3 if title else 0.0
    fig, axes = plt.subplots(
        1, ncols, figsize=(ncols * panel_w / dpi, panel_h / dpi + legend_h + title_h + 0.45),
        dpi=dpi, squeeze=False, layout="constrained",
    )  # fmt: skip
    for ax, (caption, img) in zip(axes[0], items):
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(caption, fontsize=9)
    if tmaps:
        _kinds_legend(fig, ncols)
    if title:
        fig.suptitle(textwrap.shorten(title, width=max(30, ncols * panel_w // 8)), fontsize=10)
    if out_file is None:
        return fig
    fig.savefig(out_file, dpi=dpi)
    plt.close(fig)
    return None
