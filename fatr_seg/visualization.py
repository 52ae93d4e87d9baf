"""Drawing token maps: which patches a reduction layer kept as tokens, and where the rest went.

Pure numpy/matplotlib on top of :class:`fatr_seg.layers.vit.ReductionTrace`; no mmseg import, so
the pictures can be drawn from any ``FATRVisionTransformer``. ``tools/visualize_tokens.py`` adds the
mmseg side (config, checkpoint, predicted segmentation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TokenMap", "WINDOW_COLORS", "draw_token_figure", "token_map", "token_overlay"]

# Colours of the aggregating tokens (DC windows, merged-into tokens; up to 16 per layer, then
# repeated). Saturated and far from grey so that they read on the synthetic textures.
WINDOW_COLORS = np.array(
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
        window: (H, W) int array: the token each aggregated patch went into (a DC window, the
            kept token it merged into, EViT's fused token), -1 for patches that are their own
            token.
        folded_here: (H, W) bool array: patches this layer aggregated (the rest of the
            aggregated ones were aggregated by an earlier layer).
        num_windows: Tokens that hold at least one aggregated patch.
    """

    layer: int
    window: np.ndarray
    folded_here: np.ndarray
    num_windows: int

    @property
    def num_hf(self) -> int:
        return int((self.window < 0).sum())

    @property
    def num_patches(self) -> int:
        return int(self.window.size)


def token_map(trace, previous=None, index: int = 0) -> TokenMap:
    """Turn one :class:`ReductionTrace` into a :class:`TokenMap` for image ``index``.

    Args:
        trace: The layer's ``ReductionTrace`` (``group`` is (B, N), ``hw_shape`` is (H, W)).
        previous: The trace of the previous reduction layer, or None for the first one; used to
            tell patches folded here from patches folded earlier.
        index: Image in the batch.
    """
    H, W = trace.hw_shape
    window = trace.group[index].detach().cpu().numpy().astype(np.int64).reshape(H, W)
    if previous is None:
        before = np.full_like(window, -1)
    else:
        before = previous.group[index].detach().cpu().numpy().astype(np.int64).reshape(H, W)
    folded_here = (window >= 0) & (before < 0)
    num_windows = int(np.unique(window[window >= 0]).size)
    return TokenMap(int(trace.layer), window, folded_here, num_windows)


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
    """Paint aggregated patches with their token's colour over ``image``; kept ones stay clear.

    Patches folded by this layer get a lighter tint than patches folded earlier, so the two read
    apart; the image stays faintly visible under both.

    Args:
        image: (H, W, 3) uint8 RGB image as fed to the model (before normalisation).
        tmap: The layer's :class:`TokenMap`.
        patch_size: The backbone's patch size.
        alpha: Opacity of the window colour on patches folded earlier.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    shape = image.shape[:2]
    grid = tmap.window.shape
    if grid[0] * patch_size < shape[0] or grid[1] * patch_size < shape[1]:
        raise ValueError(
            f"a {grid[0]}x{grid[1]} grid of {patch_size}-px patches does not cover the "
            f"{shape[0]}x{shape[1]} image: is this the image the model saw?"
        )
    out = image.astype(np.float32)
    window = _upsample(tmap.window, patch_size, shape)
    here = _upsample(tmap.folded_here, patch_size, shape)
    folded = window >= 0
    color = WINDOW_COLORS[np.where(folded, window, 0) % len(WINDOW_COLORS)].astype(np.float32)
    a = np.where(here, 0.7 * alpha, alpha)[..., None] * folded[..., None]
    out = out * (1 - a) + color * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


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
    """One figure: the token overlay of each layer in ``tmaps``, then extra image ``panels``.

    Args:
        image: (H, W, 3) uint8 RGB input image.
        tmaps: Token maps to draw, one panel each.
        patch_size: The backbone's patch size.
        panels: ``(caption, (H', W', 3) uint8 RGB)`` drawn after the token maps, e.g. the
            predicted segmentation from mmseg's ``SegLocalVisualizer``.
        title: Figure title.
        out_file: Save the figure here as PNG (and close it); None returns the open figure.
        dpi: Resolution of the saved PNG.
        min_panel_px: Smaller images are shown enlarged to this panel width, so the titles fit;
            from this width up, one image pixel is one PNG pixel.

    Returns:
        The matplotlib figure, or None when saved to ``out_file``.
    """
    import matplotlib

    if out_file is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    items = [(tm, token_overlay(image, tm, patch_size)) for tm in tmaps]
    items += [(caption, img) for caption, img in panels]
    h, w = image.shape[:2]
    panel_w = max(w, min_panel_px)
    panel_h = round(h * panel_w / w)
    ncols = len(items)
    legend_h, title_h = 0.35, 0.3 if title else 0.0
    fig, axes = plt.subplots(
        1, ncols, figsize=(ncols * panel_w / dpi, panel_h / dpi + legend_h + title_h + 0.45),
        dpi=dpi, squeeze=False,
    )  # fmt: skip
    max_windows = 0
    for ax, (what, img) in zip(axes[0], items):
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if isinstance(what, TokenMap):
            max_windows = max(max_windows, int(what.window.max()) + 1)
            folded = what.num_patches - what.num_hf
            plural = "s" if what.num_windows != 1 else ""
            ax.set_title(
                f"block {what.layer}: {what.num_hf}/{what.num_patches} HF tokens\n"
                f"{folded} patches in {what.num_windows} DC window{plural} "
                f"({int(what.folded_here.sum())} folded here: lighter)",
                fontsize=9,
            )
        else:
            ax.set_title(what, fontsize=9)
    handles = [Patch(facecolor="white", edgecolor="black", label="HF token (kept, untinted)")]
    handles += [
        Patch(facecolor=WINDOW_COLORS[j % len(WINDOW_COLORS)] / 255.0, label=f"DC window {j}")
        for j in range(max_windows)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False)  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=10)
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, legend_h / height, 1, 1 - title_h / height))
    if out_file is None:
        return fig
    fig.savefig(out_file, dpi=dpi)
    plt.close(fig)
    return None
