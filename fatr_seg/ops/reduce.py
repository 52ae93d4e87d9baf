"""Token selection and DC aggregation: one FATR reduction step as pure functions.

Indices are computed under ``no_grad``; features move with ``gather`` / ``scatter_add`` so that
gradients reach every kept token and every folded token through its DC mean.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .state import TokenState

__all__ = ["FoldRecord", "fold_tokens", "merge_map", "num_keep", "select_topk", "window_ids"]


def num_keep(keep_ratio: float, num_tokens: int) -> int:
    """``ceil(keep_ratio · M)``, robust to float error (``ceil(0.7 · 10)`` is 7, not 8), ≥ 1."""
    return max(1, min(num_tokens, math.ceil(round(keep_ratio * num_tokens, 6))))


@torch.no_grad()
def select_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions into the top-k by score and the rest, deterministically.

    Ties break towards the lower position (a stable descending sort), so the result never depends
    on the kernel or on the other images in the batch.

    Args:
        scores: (B, M) float.
        k: Number of positions to keep, 1 ≤ k ≤ M.

    Returns:
        ``keep`` (B, k) and ``drop`` (B, M - k), each sorted ascending (spatial order preserved).
    """
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    keep = order[:, :k].sort(dim=1).values
    drop = order[:, k:].sort(dim=1).values
    return keep, drop


def window_ids(hw_shape: tuple[int, int], windows: int, device=None) -> torch.Tensor:
    """Window of every original patch for ``windows × windows`` windows over the patch grid.

    Splits are uneven when the grid is not divisible: row ``r`` goes to window row
    ``floor(r · w / H)``. Windows are numbered row-major.

    Returns:
        (H · W,) long, values in ``[0, windows²)``.
    """
    H, W = hw_shape
    rows = torch.arange(H, device=device) * windows // H
    cols = torch.arange(W, device=device) * windows // W
    return (rows[:, None] * windows + cols[None, :]).reshape(-1)


def merge_map(old_windows: int, new_windows: int, device=None) -> torch.Tensor:
    """Window of the new (coarser) grid that each old DC window falls into, (old²,) long.

    Requires ``old_windows % new_windows == 0``: then ``floor(floor(r·wo/H) / k) = floor(r·wn/H)``
    with ``k = wo / wn``, so old windows nest exactly inside new ones.
    """
    k = old_windows // new_windows
    j = torch.arange(old_windows * old_windows, device=device)
    return (j // old_windows // k) * new_windows + (j % old_windows) // k


class FoldRecord(NamedTuple):
    """What one reduction step did, for analysis and visualisation (all in original-grid terms).

    Attributes:
        kept: (B, K) original-grid indices of the kept HF tokens.
        kept_scores: (B, K) their scores.
        folded: (B, L) original-grid indices of the tokens folded at this step.
        folded_window: (B, L) the DC window each folded token went into.
        source: (B, N) the source map after this step.
    """

    kept: torch.Tensor
    kept_scores: torch.Tensor
    folded: torch.Tensor
    folded_window: torch.Tensor
    source: torch.Tensor


def fold_tokens(
    x: torch.Tensor,
    state: TokenState,
    scores: torch.Tensor,
    keep: int,
    windows: int,
    dc_pos: torch.Tensor | None = None,
    keep_residual: bool = False,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TokenState, FoldRecord]:
    """Keep the top-``keep`` patch tokens and fold the rest into local DC tokens.

    DC token of window j is the count-weighted mean of everything folded into it so far: the
    existing DC tokens (merged by count when ``windows`` shrinks) and the newly removed tokens.
    Sums and counts accumulate in float32. A window that holds nothing stays at zero (plus its
    positional term) with count 0, never NaN.

    Args:
        x: (B, 1 + M + D, C) ``[CLS, patch tokens, DC tokens]``.
        state: The sequence's state (M patch tokens, D DC tokens).
        scores: (B, M) HF score of each patch token (higher = keep).
        keep: Number of patch tokens to keep.
        windows: DC windows per side after this step; must divide ``state.windows`` if DC tokens
            exist already.
        dc_pos: Optional (windows², C) positional term added to the DC tokens.
        keep_residual: Also track ``state.residual`` for ``restore='residual'``.
        weights: Optional (B, M) fusion weight of each patch token (EViT fuses by attention);
            DC tokens are then weighted running means, their total weight kept in
            ``state.dc_weight``. None gives plain (count-weighted) means.

    Returns:
        ``x`` (B, 1 + keep + windows², C), the new state and a :class:`FoldRecord`.

    Note:
        It always rebuilds the DC tokens and adds ``dc_pos``; a layer with nothing to fold
        (``keep == M``, windows unchanged) must not call it (the reducer skips it then).
    """
    B, _, C = x.shape
    M, D = state.num_patches, state.num_dc
    num_win = windows * windows
    device = x.device
    keep_pos, drop_pos = select_topk(scores, keep)  # positions in 0..M-1
    with torch.no_grad():
        drop_orig = state.patch_idx.gather(1, drop_pos)  # (B, L)
        drop_win = window_ids(state.hw_shape, windows, device)[drop_orig]  # (B, L)
        dc_to_new = merge_map(state.windows, windows, device) if D else drop_win.new_zeros(0)

    patches = x[:, 1 : 1 + M]
    hf = patches.gather(1, keep_pos[..., None].expand(-1, -1, C))
    lf = patches.gather(1, drop_pos[..., None].expand(-1, -1, C))

    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 for fp16/bf16, fp64 stays fp64
    ones = torch.ones_like(drop_win, dtype=torch.float32)
    w_lf = ones if weights is None else weights.float().gather(1, drop_pos)  # (B, L)
    sums = x.new_zeros(B, num_win, C, dtype=acc)
    sums = sums.scatter_add(1, drop_win[..., None].expand(-1, -1, C), lf.to(acc) * w_lf[..., None])
    counts = torch.zeros(B, num_win, device=device).scatter_add(1, drop_win, ones)
    wsum = None if weights is None else torch.zeros_like(counts).scatter_add(1, drop_win, w_lf)
    if D:
        old_w = state.dc_count if state.dc_weight is None else state.dc_weight
        idx = dc_to_new.expand(B, D)
        old_dc = x[:, 1 + M :].to(acc) * old_w[..., None]
        sums = sums.scatter_add(1, idx[..., None].expand(-1, -1, C), old_dc)
        counts = counts.scatter_add(1, idx, state.dc_count)
        if weights is not None:
            wsum = wsum.scatter_add(1, idx, old_w)
    wsum = counts if weights is None else wsum
    # Windows that hold nothing keep 0 (weight 0 -> divide by 1), never NaN.
    denom = torch.where(wsum > 0, wsum, torch.ones_like(wsum))
    dc = (sums / denom[..., None]).to(x.dtype)  # (B, num_win, C)
    if dc_pos is not None:
        dc = dc + dc_pos.to(x.dtype)
    x = torch.cat([x[:, :1], hf, dc], dim=1)

    with torch.no_grad():
        # Old position (patch or DC) -> new position; then push the source map through it.
        old_to_new = keep_pos.new_empty(B, M + D)
        old_to_new.scatter_(1, keep_pos, torch.arange(keep, device=device).expand(B, keep))
        old_to_new.scatter_(1, drop_pos, keep + drop_win)
        if D:
            old_to_new[:, M:] = keep + dc_to_new
        source = old_to_new.gather(1, state.source)
        patch_idx = state.patch_idx.gather(1, keep_pos)

    residual = state.residual
    if keep_residual:
        if residual is None:
            residual = x.new_zeros(B, state.source.shape[1], C)
        dc_then = dc.gather(1, drop_win[..., None].expand(-1, -1, C))
        residual = residual.scatter(1, drop_orig[..., None].expand(-1, -1, C), lf - dc_then)

    new_state = state.replace(
        source=source, patch_idx=patch_idx, dc_count=counts, windows=windows, residual=residual,
        dc_weight=None if weights is None else wsum,
        patch_size=None if state.patch_size is None else state.patch_size.gather(1, keep_pos),
        # The one host read of this step: every later block's key bias depends on it.
        has_empty_dc=not bool((counts > 0).all()),
    )  # fmt: skip
    record = FoldRecord(
        kept=patch_idx,
        kept_scores=scores.gather(1, keep_pos),
        folded=drop_orig,
        folded_window=drop_win,
        source=source,
    )
    return x, new_state, record
