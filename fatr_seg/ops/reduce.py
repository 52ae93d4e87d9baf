"""Aggregation into DC tokens (FATR's paper form), and what every aggregation shares.

Indices are computed under ``no_grad``; features move with ``gather`` / ``scatter_add`` so that
gradients reach every kept token and every folded token through its DC mean.
"""

from __future__ import annotations

import torch

from .state import TokenState

__all__ = ["ReductionRecord", "accumulate_residual", "dc_window_ids", "fold_tokens", "window_ids"]


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


def dc_window_ids(
    hw_shape: tuple[int, int], grid: tuple[str, int], device=None
) -> tuple[torch.Tensor, int]:
    """DC window of every original patch, and the number of windows.

    Args:
        hw_shape: The patch grid (H, W).
        grid: ``('side', w)``: ``w × w`` windows over the grid, whatever its size (the paper's
            form); ``('size', s)``: windows of ``s × s`` patches (the last row and column of
            windows may be smaller), so windows stay local at every input size.

    Returns:
        ``ids`` (H·W,) long and the window count.
    """
    kind, value = grid
    if kind == "side":
        return window_ids(hw_shape, value, device), value * value
    if kind != "size":
        raise ValueError(f"DC grid kind must be 'side' or 'size', got {kind!r}")
    H, W = hw_shape
    gw = -(-W // value)
    rows = torch.arange(H, device=device) // value
    cols = torch.arange(W, device=device) // value
    return (rows[:, None] * gw + cols[None, :]).reshape(-1), -(-H // value) * gw


class ReductionRecord:
    """What one reduction step did, for analysis and visualisation (all in original-grid terms).

    A field may be given as a zero-argument function: it is called (without autograd) when the
    field is first read, so a forward that never reads the record launches none of its kernels.
    Reads like the named tuple it was: attributes, ``rec[i]``, unpacking.

    Attributes:
        kept: (B, K) original-grid indices of the kept patch tokens (-1: a token with no cell,
            such as EViT's fused token).
        kept_scores: (B, K) their scores.
        folded: (B, L) original-grid indices of the tokens dropped at this step.
        folded_window: (B, L) where each went: its DC window, or the new position of the token it
            joined.
        source: (B, N) the source map after this step.
    """

    _fields = ("kept", "kept_scores", "folded", "folded_window", "source")
    __slots__ = ("_values",)

    def __init__(self, kept, kept_scores, folded, folded_window, source) -> None:
        self._values = [kept, kept_scores, folded, folded_window, source]

    def _get(self, i: int) -> torch.Tensor:
        value = self._values[i]
        if callable(value):
            with torch.no_grad():
                value = self._values[i] = value()
        return value

    kept = property(lambda self: self._get(0))
    kept_scores = property(lambda self: self._get(1))
    folded = property(lambda self: self._get(2))
    folded_window = property(lambda self: self._get(3))
    source = property(lambda self: self._get(4))

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._get(range(5)[i])

    def __iter__(self):
        return (self._get(i) for i in range(5))

    def __len__(self) -> int:
        return 5

    def __repr__(self) -> str:
        return "ReductionRecord(" + ", ".join(f"{k}={self._get(i)!r}" for i, k in
                                         enumerate(self._fields)) + ")"  # fmt: skip


@torch.no_grad()
def token_map(
    state: TokenState, keep_pos: torch.Tensor, drop_pos: torch.Tensor, drop_to: torch.Tensor,
    dc_to: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Where every token goes in one reduction step, and the source map pushed through it.

    Args:
        state: The state before the step (``M`` patch tokens, ``D`` DC tokens).
        keep_pos: (B, K) positions of the kept patch tokens; the k-th goes to new position k.
        drop_pos: (B, L) positions of the dropped patch tokens.
        drop_to: (B, L) new position of the token each dropped one joins.
        dc_to: (D,) or (B, D) new position of each old DC token (None when D is 0).

    Returns:
        ``old_to_new`` (B, M + D) and the new ``source`` (B, N).
    """
    B, K = keep_pos.shape
    old_to_new = keep_pos.new_empty(B, state.num_patches + state.num_dc)
    old_to_new.scatter_(1, keep_pos, torch.arange(K, device=keep_pos.device).expand(B, K))
    old_to_new.scatter_(1, drop_pos, drop_to)
    if dc_to is not None:
        old_to_new[:, state.num_patches :] = dc_to
    return old_to_new, old_to_new.gather(1, state.source)


def accumulate_residual(
    state: TokenState, old: torch.Tensor, new: torch.Tensor, old_to_new: torch.Tensor
) -> torch.Tensor:
    """``state.residual`` after one reduction step, for ``restore='residual'``.

    Every original patch accumulates, at each step, the value of the token that represented it
    before the step minus the value of the token that represents it after. Restoring a patch as
    ``representative_now + residual`` therefore gives back the token it was part of at every step
    before it was aggregated, plus every change that its representative went through since: a
    folded or merged patch keeps its own feature, and a kept token's patch (old delta 0) is exact.

    Args:
        state: The state before the step.
        old: (B, M + D, C) the sequence without CLS before the step.
        new: (B, M' + D', C) the sequence without CLS after the step.
        old_to_new: (B, M + D) long, the new position of each old token's representative.

    Returns:
        (B, N, C) the new residual.
    """
    C = old.shape[-1]
    rep = new.gather(1, old_to_new[..., None].expand(-1, -1, C))  # (B, M + D, C)
    delta = old - rep
    residual = state.residual
    step = delta.gather(1, state.source[..., None].expand(-1, -1, C))  # (B, N, C)
    return step if residual is None else residual + step


def fold_tokens(
    x: torch.Tensor,
    state: TokenState,
    keep_pos: torch.Tensor,
    drop_pos: torch.Tensor,
    scores: torch.Tensor,
    grid: tuple[str, int],
    dc_pos: torch.Tensor | None = None,
    keep_residual: bool = False,
) -> tuple[torch.Tensor, TokenState, ReductionRecord]:
    """Keep the ``keep_pos`` patch tokens and fold the dropped ones into local DC tokens.

    DC token of window j is the count-weighted mean of everything folded into it so far: the
    existing DC tokens (merged by count when the DC grid coarsens) and the newly dropped tokens,
    each weighted by the patches it stands for. Sums and counts accumulate in float32. A window
    that holds nothing stays at zero (plus its positional term) with count 0, never NaN.

    Args:
        x: (B, 1 + M + D, C) ``[CLS, patch tokens, DC tokens]``.
        state: The sequence's state (M patch tokens, D DC tokens).
        keep_pos: (B, K) kept positions, ascending.
        drop_pos: (B, L) dropped positions.
        scores: (B, M) the scores of the split (for the record).
        grid: DC windows after this step (see :func:`dc_window_ids`); existing DC windows must
            nest in them.
        dc_pos: Optional positional term added to the DC tokens, (num_windows, C) or (1, C).
        keep_residual: Also track ``state.residual`` for ``restore='residual'``.

    Returns:
        ``x`` (B, 1 + K + num_windows, C), the new state and a :class:`ReductionRecord`.
    """
    B, _, C = x.shape
    M, D = state.num_patches, state.num_dc
    K = keep_pos.shape[1]
    device = x.device
    with torch.no_grad():
        win_of_patch, num_win = dc_window_ids(state.hw_shape, grid, device)
        drop_orig = state.patch_idx.gather(1, drop_pos)  # (B, L)
        drop_win = win_of_patch[drop_orig]  # (B, L)
        if D:
            old_win, _ = dc_window_ids(state.hw_shape, state.dc_grid, device)
            dc_to_new = torch.zeros(D, dtype=torch.long, device=device)
            dc_to_new.scatter_(0, old_win, win_of_patch)  # nested windows: any member agrees

    patches = x[:, 1 : 1 + M]
    hf = patches.gather(1, keep_pos[..., None].expand(-1, -1, C))
    lf = patches.gather(1, drop_pos[..., None].expand(-1, -1, C))

    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 for fp16/bf16, fp64 stays fp64
    w_lf = state.sizes().gather(1, drop_pos)  # (B, L) patches each dropped token stands for
    sums = x.new_zeros(B, num_win, C, dtype=acc)
    sums = sums.scatter_add(1, drop_win[..., None].expand(-1, -1, C), lf.to(acc) * w_lf[..., None])
    counts = torch.zeros(B, num_win, device=device).scatter_add(1, drop_win, w_lf)
    if D:
        idx = dc_to_new.expand(B, D)
        old_dc = x[:, 1 + M :].to(acc) * state.dc_count[..., None]
        sums = sums.scatter_add(1, idx[..., None].expand(-1, -1, C), old_dc)
        counts = counts.scatter_add(1, idx, state.dc_count)
    # Windows that hold nothing keep 0 (weight 0 -> divide by 1), never NaN.
    denom = torch.where(counts > 0, counts, torch.ones_like(counts))
    dc = (sums / denom[..., None]).to(x.dtype)  # (B, num_win, C)
    if dc_pos is not None:
        dc = dc + dc_pos.to(x.dtype)
    new_x = torch.cat([x[:, :1], hf, dc], dim=1)

    with torch.no_grad():
        # Old position (patch or DC) -> new position; then push the source map through it.
        dc_to = K + dc_to_new if D else None
        old_to_new, source = token_map(state, keep_pos, drop_pos, K + drop_win, dc_to)
        patch_idx = state.patch_idx.gather(1, keep_pos)

    residual = state.residual
    if keep_residual:
        residual = accumulate_residual(state, x[:, 1:], new_x[:, 1:], old_to_new)
    new_state = state.replace(
        source=source, patch_idx=patch_idx, dc_count=counts, dc_grid=grid, residual=residual,
        patch_size=None if state.patch_size is None else state.patch_size.gather(1, keep_pos),
    )  # fmt: skip
    record = ReductionRecord(
        kept=patch_idx,
        kept_scores=scores.gather(1, keep_pos),
        folded=drop_orig,
        folded_window=drop_win,
        source=source,
    )
    return new_x, new_state, record
