"""Local windows on the unreduced patch grid: FATR's early local stage and ALGM's local step.

A ``w × w`` window of low-frequency patches is folded into one token, the mean of its patches
(the paper's local DC token at the finest grain). Which windows fold is decided per image by a
window score (lower folds first); how many is a fixed count, so every image of a batch keeps the
same number of tokens and shapes stay static (no host read, CUDA graphs and compile work).

The fold is expressed as a score and a proposed partner per token (:func:`window_fold_scores`),
and as the :class:`fatr_seg.ops.MergePlan` that a top-k of those scores gives
(:func:`window_fold_plan`, in few kernels): a folded window's members join its last
(bottom-right) member, as their size-weighted mean (``merge_planned``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import cached_constant
from .merge import MergePlan
from .precision import float32_matmul

__all__ = [
    "num_windows",
    "window_fold_plan",
    "window_fold_scores",
    "window_hf_priority",
    "window_members",
    "window_scores",
    "window_similarity",
]


def num_windows(hw_shape: tuple[int, int], window: int) -> int:
    """Whole ``window × window`` windows on an (H, W) grid (a remainder row/column is in none)."""
    return (hw_shape[0] // window) * (hw_shape[1] // window)


def window_members(hw_shape: tuple[int, int], window: int, device=None) -> torch.Tensor:
    """(G, w²) long: the grid positions of each whole window's patches, row-major inside it.

    Windows are numbered row-major; the last member of each is its bottom-right patch.
    """
    H, W = hw_shape
    gh, gw = H // window, W // window
    pos = torch.arange(H * W, device=device).view(H, W)[: gh * window, : gw * window]
    win = pos.reshape(gh, window, gw, window).permute(0, 2, 1, 3)  # (gh, gw, w, w)
    return win.reshape(gh * gw, window * window)


@torch.no_grad()
def window_similarity(metric: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """(B, G) mean cosine similarity of the distinct pairs of each window's tokens.

    Args:
        metric: (B, N, d) features of the N patch tokens in grid order.
        win: (G, s) window members (:func:`window_members`), s ≥ 2.
    """
    s = win.shape[1]
    m = F.normalize(metric.float(), dim=-1)[:, win]  # (B, G, s, d)
    pair_sum = float32_matmul(m, m.transpose(-2, -1)).sum(dim=(-2, -1)) - m.pow(2).sum(dim=(-2, -1))
    return pair_sum / (s * (s - 1))


@torch.no_grad()
def window_hf_priority(hf: torch.Tensor, hw_shape: tuple[int, int], window: int) -> torch.Tensor:
    """(B, G) a window's HF priority: the highest HF score among its tokens.

    A window folds only when all its tokens are low-frequency: one HF token (an edge, a pole,
    a small object) keeps its whole window.

    Args:
        hf: (B, N) HF scores of the patch tokens in grid order.
        hw_shape: The patch grid (H, W), ``N = H · W``.
        window: Window side in patches.
    """
    # One reduction over a (B, gh, w, gw, w) view of the grid: no gather of the members.
    return _window_view(hf, hw_shape, window).amax(dim=(2, 4)).flatten(1)


def _window_view(t: torch.Tensor, hw_shape: tuple[int, int], window: int) -> torch.Tensor:
    """The whole windows of a (B, H·W) grid-ordered tensor as a (B, gh, w, gw, w) view."""
    H, W = hw_shape
    gh, gw = H // window, W // window
    grid = t.unflatten(1, (H, W))[:, : gh * window, : gw * window]
    return grid.unflatten(2, (gw, window)).unflatten(1, (gh, window))


@torch.no_grad()
def window_fold_scores(
    priority: torch.Tensor, win: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores and partners that fold the lowest-priority windows, whole, into one token.

    Every window gets its rank by ``priority`` (0 = lowest, ties to the lower window index); its
    members but the last score that rank and propose the last member as partner, which scores
    ``+inf`` as do tokens in no window. A top-k of these scores that drops ``F · (s - 1)`` tokens
    therefore folds exactly the ``F`` lowest-priority windows, whatever ties the priorities have.

    Args:
        priority: (B, G) window priority (higher: kept as separate tokens first).
        win: (G, s) window members.
        num_tokens: N, the patch tokens in grid order.

    Returns:
        ``scores`` (B, N) float32 and ``partner`` (B, N) long positions (a token that is not a
        folding member is its own partner).
    """
    B, G = priority.shape
    if G == 0 or win.shape[1] == 1:
        return _member_scores(priority.new_zeros(B, 0), win[:0], num_tokens)
    order = torch.sort(priority.float(), dim=1, stable=True).indices  # (B, G), lowest first
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(G, device=priority.device).expand(B, G)
    )  # (B, G)
    return _member_scores(rank.float(), win, num_tokens)


@torch.no_grad()
def window_fold_plan(
    priority: torch.Tensor, hw_shape: tuple[int, int], window: int, num_drop: int
) -> MergePlan:
    """The merges of :func:`window_fold_scores` followed by a top-k that drops ``num_drop``
    tokens, as a :class:`MergePlan`: the same split, partners and order, in seven kernels on a
    grid the windows tile (ten otherwise): one sort ranks the windows, one orders the kept
    tokens, one inverts that order, and the members' masks and partners are elementwise ops on
    a (B, gh, w, gw, w) view of the grid, so no member index is gathered.

    Args:
        priority: (B, G) window priority (the lowest fold first, ties to the lower window).
        hw_shape: The patch grid (H, W); the tokens are its ``N = H · W`` patches in grid order.
        window: Window side w ≥ 2 in patches.
        num_drop: Tokens removed, a whole number of windows: ``F · (w² - 1)``, F ≤ G.
    """
    B, G = priority.shape
    H, W = hw_shape
    per = window * window - 1
    folds = num_drop // per if per else 0
    if per < 1 or folds * per != num_drop or folds > G:
        raise ValueError(f"{num_drop} tokens are no whole number of the {G} windows of "
                         f"{per + 1} tokens")  # fmt: skip
    folded = torch.sort(priority.float(), dim=1, stable=True).indices[:, :folds]  # (B, F)
    fold = torch.zeros(B, G, dtype=torch.bool, device=priority.device).scatter_(1, folded, True)
    gh, gw = H // window, W // window
    member = _leaving_members(window, priority.device)[:, None]  # (w, 1, w)
    fold = fold.view(B, gh, 1, gw, 1)
    tiled = gh * window == H and gw * window == W
    if tiled:  # the mask of the windows' members is the whole key
        key = torch.logical_and(fold, member).view(B, H * W)
    else:  # tokens in no window stay
        key = torch.zeros(B, H * W, dtype=torch.bool, device=priority.device)
        _window_view(key, hw_shape, window).copy_(torch.logical_and(fold, member))
    perm = key.sort(dim=1, stable=True).indices  # kept ascending, then the dropped ascending
    old_to_new = perm.argsort(dim=1)
    # A leaving member takes the new position of its window's last member.
    pos = _window_view(old_to_new, hw_shape, window)
    joined = torch.where(_window_view(key, hw_shape, window), pos[:, :, -1:, :, -1:], pos)
    if tiled:
        old_to_new = joined.view(B, H * W)
    else:
        pos.copy_(joined)

    def scores() -> torch.Tensor:
        return window_fold_scores(priority, window_members(hw_shape, window, priority.device),
                                  H * W)[0]  # fmt: skip

    return MergePlan(perm, old_to_new, H * W - num_drop, scores)


def _leaving_members(window: int, device: torch.device) -> torch.Tensor:
    """(w, w) bool: every member of a window but its last (bottom-right), which the others join.
    Built once per window size and device (a constant each reduction would rebuild)."""

    def build() -> torch.Tensor:
        mask = torch.ones(window, window, dtype=torch.bool, device=device)
        mask[-1, -1] = False
        return mask

    return cached_constant(("leaving", window), device, build)


def _member_scores(
    per_window: torch.Tensor, win: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window's members but the last score ``per_window`` (B, G) and propose the last as
    partner; every other token scores ``+inf`` and is its own partner."""
    B = per_window.shape[0]
    device = per_window.device
    partner = torch.arange(num_tokens, device=device).expand(B, num_tokens).clone()
    scores = torch.full((B, num_tokens), float("inf"), device=device)
    s = win.shape[1]
    if win.shape[0] == 0 or s == 1:
        return scores, partner
    members = win[:, :-1].reshape(-1)  # every token but the last of each window
    scores[:, members] = per_window.float().repeat_interleave(s - 1, dim=1)
    partner[:, members] = win[:, -1:].expand(-1, s - 1).reshape(-1)
    return scores, partner


@torch.no_grad()
def window_scores(
    metric: torch.Tensor, hw_shape: tuple[int, int], window: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALGM's local merging as a score and a proposed partner, on an unreduced grid.

    A window's score is minus its similarity (:func:`window_similarity`); its members but the
    last score it and propose the last as partner, the others score ``+inf``. So the top-k
    drops whole windows, most similar first, into their last token (ALGM's token-level budget:
    the last window may fold only in part).

    Args:
        metric: (B, N, d) features of the N = H·W patch tokens in grid order (ALGM: the block's
            output tokens).
        hw_shape: The patch grid (H, W).
        window: Window side in patches.

    Returns:
        ``scores`` (B, N) float32 and ``partner`` (B, N) long positions.
    """
    B, N, _ = metric.shape
    H, W = hw_shape
    if N != H * W:
        raise ValueError(f"window_scores needs the full {H}x{W} grid in order, got {N} tokens")
    win = window_members(hw_shape, window, metric.device)
    if win.shape[0] == 0 or win.shape[1] == 1:
        return _member_scores(metric.new_zeros(B, 0), win, N)
    return _member_scores(-window_similarity(metric, win), win, N)  # (B, G): most similar first
