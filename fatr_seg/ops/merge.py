"""Aggregation by merging: dropped tokens join a kept token (size-weighted means).

This is the aggregation of ToMe (a dropped token joins its matched partner), of ALGM (a 2×2
window joins one of its tokens) and of fatr_seg's dense default (a low-frequency token joins the
kept token it is most similar to). Unlike DC windows it adds no token, and a merged patch is
restored as a copy of a token that was similar to it, not of a spatial average.

Indices are computed under ``no_grad``; features move with ``gather`` / ``scatter_add``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .constants import cached_constant
from .precision import float32_matmul
from .reduce import ReductionRecord, accumulate_residual, token_map
from .state import TokenState, is_initial

__all__ = [
    "MergePlan",
    "bipartite_plan",
    "fuse_tokens",
    "merge_planned",
    "merge_tokens",
    "nearest_kept",
    "partner_plan",
]

# Cosine similarities lie in [-1, 1]; a penalty of 3 ranks any far candidate below every near one.
_FAR_PENALTY = 3.0


@torch.no_grad()
def nearest_kept(
    metric: torch.Tensor,
    keep_pos: torch.Tensor,
    drop_pos: torch.Tensor,
    patch_idx: torch.Tensor | None = None,
    hw_shape: tuple[int, int] | None = None,
    radius: int | None = None,
) -> torch.Tensor:
    """The kept token most similar to each dropped token (cosine similarity of ``metric``).

    Args:
        metric: (B, M, d) similarity features of the patch tokens (e.g. keys averaged over heads).
        keep_pos: (B, K) positions of the kept tokens.
        drop_pos: (B, L) positions of the dropped tokens.
        patch_idx: (B, M) original-grid index of each token; needed with ``radius``.
        hw_shape: The patch grid (H, W); needed with ``radius``.
        radius: If set, prefer kept tokens within ``radius`` patches (Chebyshev distance on the
            original grid); a dropped token with no kept token that near takes the most similar
            one anywhere. Tokens without a grid position (``patch_idx < 0``) count as far.

    Returns:
        (B, L) long: for every dropped token, an index into ``keep_pos`` (0..K-1). Ties go to
        the lower index.
    """
    C = metric.shape[-1]
    m = F.normalize(metric.float(), dim=-1)
    mk = m.gather(1, keep_pos[..., None].expand(-1, -1, C))  # (B, K, d)
    md = m.gather(1, drop_pos[..., None].expand(-1, -1, C))  # (B, L, d)
    sim = float32_matmul(md, mk.transpose(1, 2))  # (B, L, K)
    if radius is not None:
        if patch_idx is None or hw_shape is None:
            raise ValueError("nearest_kept with a radius needs patch_idx and hw_shape")
        W = hw_shape[1]
        pk, pd = patch_idx.gather(1, keep_pos), patch_idx.gather(1, drop_pos)
        far = (pk[:, None, :] < 0) | (pd[:, :, None] < 0)
        far |= ((pk // W)[:, None, :] - (pd // W)[:, :, None]).abs() > radius
        far |= ((pk % W)[:, None, :] - (pd % W)[:, :, None]).abs() > radius
        sim = sim - far.float() * _FAR_PENALTY
    return sim.argmax(dim=-1)


class MergePlan(NamedTuple):
    """Where every patch token goes in one merging step (index tensors only, no features).

    Attributes:
        perm: (B, M) long: the kept positions in the merged sequence's order, then the positions
            of the tokens that merge away, ascending.
        old_to_new: (B, M) long: the new position (0..K-1) of the token each patch token is, or
            joins.
        num_keep: K.
        scores: Zero-argument function giving the (B, M) scores the split was made by, for the
            record only (built when the record is read).
    """

    perm: torch.Tensor
    old_to_new: torch.Tensor
    num_keep: int
    scores: Callable[[], torch.Tensor]


@torch.no_grad()
def bipartite_plan(
    metric: torch.Tensor,
    priority: torch.Tensor | None,
    num_protected: int,
    num_keep: int,
    peer_order: bool = False,
) -> MergePlan:
    """Bipartite matching (ToMe's, or among the unprotected tokens) as a :class:`MergePlan`.

    The same split, partners and merges as :func:`fatr_seg.ops.protected_bipartite_scores`
    followed by :func:`fatr_seg.ops.select_topk` (``num_protected`` 0: as
    :func:`fatr_seg.ops.bipartite_scores`), in few kernels and without the (B, M) score and
    partner arrays: one sort protects, one orders the free tokens, one ranks the A tokens by
    their best similarity (a stable ascending sort of it is the tail that ``select_topk`` drops:
    the most similar edges, ties to the higher position), one orders the kept tokens and one
    inverts that order.

    Args:
        metric: (B, M, d) similarity features of the patch tokens.
        priority: (B, M) protection priority (higher first, ties to the lower position); unused
            when ``num_protected`` is 0.
        num_protected: P, 0 ≤ P ≤ M.
        num_keep: K; the ``M - K`` merges must not exceed the A tokens, ``⌊(M - P) / 2⌋``.
        peer_order: The kept tokens in ToMe's order (unmerged A tokens, then B tokens, each
            ascending) instead of ascending; only with ``num_protected`` 0.
    """
    B, M, d = metric.shape
    R, P = M - num_keep, num_protected
    if peer_order and P:
        raise ValueError("peer_order needs num_protected=0")
    free = None
    if P:
        order = torch.sort(priority.float(), dim=1, descending=True, stable=True).indices
        free = order[:, P:].sort(dim=1).values  # (B, M - P): the unprotected positions, in order
        metric = metric.gather(1, free[..., None].expand(-1, -1, d))
    num_a = (M - P) // 2
    if R > num_a:
        raise ValueError(f"{R} merges need as many A tokens; there are {num_a}")
    m = F.normalize(metric.float(), dim=-1)
    best, dst = float32_matmul(m[:, 1::2], m[:, 0::2].transpose(1, 2)).max(dim=-1)  # (B, |A|)
    tail = best.sort(dim=1, stable=True).indices[:, num_a - R :]  # the A tokens that merge
    # Sort key: 0 kept, 1 merged away (ToMe's order: 0 unmerged A, 1 B, 2 merged away).
    key = torch.zeros(B, M, dtype=torch.int8, device=metric.device)
    if free is None:
        if peer_order:
            key[:, 0::2] = 1
        key[:, 1::2].scatter_(1, tail, 2 if peer_order else 1)
    else:
        drop = free[:, 1::2].gather(1, tail)
        key.scatter_(1, drop, 1)
    perm = key.sort(dim=1, stable=True).indices
    old_to_new = perm.argsort(dim=1)  # right for the kept tokens; the merged ones next
    partner = dst.gather(1, tail)  # (B, R): the B token each merged A token joins
    if free is None:
        joined = old_to_new[:, 0::2].gather(1, partner)
        old_to_new[:, 1::2].scatter_(1, tail, joined)
    else:
        joined = old_to_new.gather(1, free[:, 0::2].gather(1, partner))
        old_to_new.scatter_(1, drop, joined)

    def scores() -> torch.Tensor:
        s = torch.full((B, M), float("inf"), device=metric.device)
        if free is None:
            s[:, 1::2] = -best
        else:
            s.scatter_(1, free[:, 1::2], -best)
        return s

    return MergePlan(perm, old_to_new, num_keep, scores)


@torch.no_grad()
def partner_plan(
    keep_pos: torch.Tensor, drop_pos: torch.Tensor, partner: torch.Tensor, scores: torch.Tensor
) -> MergePlan:
    """A :class:`MergePlan` from a split and the partner a score proposes for every position.

    Args:
        keep_pos: (B, K) kept positions, in the merged sequence's order.
        drop_pos: (B, L) dropped positions, ascending.
        partner: (B, M) the position each token would join; a dropped token's must be kept.
        scores: (B, M) the scores of the split (for the record).
    """
    B, K = keep_pos.shape
    old_to_new = keep_pos.new_empty(B, partner.shape[1])
    old_to_new.scatter_(1, keep_pos, torch.arange(K, device=keep_pos.device).expand(B, K))
    old_to_new.scatter_(1, drop_pos, old_to_new.gather(1, partner.gather(1, drop_pos)))
    return MergePlan(torch.cat([keep_pos, drop_pos], dim=1), old_to_new, K, lambda: scores)


def merge_tokens(
    x: torch.Tensor,
    state: TokenState,
    keep_pos: torch.Tensor,
    drop_pos: torch.Tensor,
    dst: torch.Tensor,
    scores: torch.Tensor,
    keep_residual: bool = False,
    prop_attn: bool = True,
) -> tuple[torch.Tensor, TokenState, ReductionRecord]:
    """Merge every dropped patch token into a kept one; DC tokens pass through unchanged.

    A merged token is the size-weighted mean of its members, ``Σ sᵢ xᵢ / Σ sᵢ``, where the size
    ``s`` counts the original patches a token stands for (``state.patch_size``, 1 when None).
    Sizes are kept in the new state; with ``prop_attn`` later blocks attend with ``log(size)``
    (proportional attention), so a merged token weighs as much as the patches it replaced.

    Args:
        x: (B, 1 + M + D, C) ``[CLS, patch tokens, DC tokens]``.
        state: The sequence's state.
        keep_pos: (B, K) kept positions, in the order the merged sequence takes.
        drop_pos: (B, L) dropped positions.
        dst: (B, L) long, for each dropped token the index into ``keep_pos`` it joins.
        scores: (B, M) the scores the split was made by (for the record only).
        keep_residual: Track ``state.residual`` for ``restore='residual'``.
        prop_attn: Proportional attention in later blocks.

    Returns:
        ``x`` (B, 1 + K + D, C), the new state and a :class:`ReductionRecord` (``folded_window`` =
        the new position of the token each dropped token joined).
    """
    with torch.no_grad():
        K = keep_pos.shape[1]
        old_to_new = keep_pos.new_empty(keep_pos.shape[0], state.num_patches)
        old_to_new.scatter_(1, keep_pos, torch.arange(K, device=x.device).expand_as(keep_pos))
        old_to_new.scatter_(1, drop_pos, dst)
        perm = torch.cat([keep_pos, drop_pos], dim=1)
    plan = MergePlan(perm, old_to_new, K, lambda: scores)
    return merge_planned(x, state, plan, keep_residual, prop_attn)


def merge_planned(
    x: torch.Tensor,
    state: TokenState,
    plan: MergePlan,
    keep_residual: bool = False,
    prop_attn: bool = True,
) -> tuple[torch.Tensor, TokenState, ReductionRecord]:
    """Carry out a :class:`MergePlan`: size-weighted means, the new state and a lazy record.

    Every patch token is added, weighted by its size, into the slot of the token it becomes or
    joins (one ``scatter_add`` for the features, one for the sizes), so no kept or dropped rows
    are gathered first. See :func:`merge_tokens` for the arguments and the result.
    """
    B, _, C = x.shape
    M, D = state.num_patches, state.num_dc
    K, old_to_new = plan.num_keep, plan.old_to_new
    acc = torch.promote_types(x.dtype, torch.float32)
    patches = x[:, 1 : 1 + M].to(acc)
    cls_sizes = _cls_slot(B, K, acc, x.device)  # (B, 1 + K) [1, 0, ...]: the key bias is its log
    new_size = cls_sizes[:, 1:]
    if state.patch_size is None and torch.compiler.is_compiling():
        # Inductor (torch 2.14) lowers scatter(value, reduce='add') with src shaped like self.
        new_size.scatter_add_(1, old_to_new, torch.ones_like(old_to_new, dtype=acc))
    elif state.patch_size is None:  # every token is one patch: count the members
        new_size.scatter_(1, old_to_new, 1.0, reduce="add")
    else:
        size = state.patch_size.to(acc)
        patches = patches * size[..., None]
        new_size.scatter_add_(1, old_to_new, size)
    sums = patches.new_zeros(B, K, C).scatter_add_(1, old_to_new[..., None].expand(-1, -1, C),
                                                   patches)  # fmt: skip
    merged = (sums / new_size[..., None]).to(x.dtype)
    new_x = torch.cat([x[:, :1], merged, x[:, 1 + M :]], dim=1)

    keep_pos, drop_pos = plan.perm[:, :K], plan.perm[:, K:]
    with torch.no_grad():
        to_new = old_to_new
        if D:
            dc_to = K + torch.arange(D, device=x.device)
            to_new = torch.cat([old_to_new, dc_to.expand(B, D)], dim=1)
        if is_initial(state):  # both maps are the identity: nothing to push through them
            source, patch_idx = to_new, keep_pos
        else:
            source = to_new.gather(1, state.source)
            patch_idx = state.patch_idx.gather(1, keep_pos)
    residual = state.residual
    if keep_residual:
        residual = accumulate_residual(state, x[:, 1:], new_x[:, 1:], to_new)

    cls_sizes = cls_sizes.float()
    new_state = state.replace(
        source=source,
        patch_idx=patch_idx,
        patch_size=cls_sizes[:, 1:],
        cls_sizes=cls_sizes,
        residual=residual,
        prop_attn=prop_attn,
    )
    old_idx = state.patch_idx
    record = ReductionRecord(
        kept=patch_idx,
        kept_scores=lambda: plan.scores().gather(1, keep_pos),
        folded=lambda: old_idx.gather(1, drop_pos),
        folded_window=lambda: old_to_new.gather(1, drop_pos),
        source=source,
    )
    return new_x, new_state, record


def _cls_slot(batch: int, num: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(B, 1 + num) ``[1, 0, ..., 0]``, one copy of a cached row (zeros plus a write of the 1
    would be two kernels)."""
    row = cached_constant(("cls_slot", num, dtype), device, lambda: F.pad(
        torch.zeros(1, num, dtype=dtype, device=device), (1, 0), value=1.0))  # fmt: skip
    return row.expand(batch, -1).clone(memory_format=torch.contiguous_format)


def fuse_tokens(
    x: torch.Tensor,
    state: TokenState,
    keep_pos: torch.Tensor,
    drop_pos: torch.Tensor,
    weights: torch.Tensor,
    scores: torch.Tensor,
    keep_residual: bool = False,
) -> tuple[torch.Tensor, TokenState, ReductionRecord]:
    """EViT's fusion: the dropped tokens become ONE token, their weighted sum ``Σ wᵢ xᵢ``.

    As in EViT's code the weights are the CLS attention of the dropped tokens and the sum is not
    normalised. The fused token is appended to the patch tokens with grid index -1, so in a later
    reduction layer it competes for a place like any token (and may be fused again). DC tokens
    pass through unchanged.

    Args:
        x: (B, 1 + M + D, C).
        state: The sequence's state.
        keep_pos: (B, K) kept positions, ascending.
        drop_pos: (B, L) dropped positions, L ≥ 1.
        weights: (B, M) fusion weight of every token.
        scores: (B, M) the scores of the split (for the record).
        keep_residual: Track ``state.residual``.

    Returns:
        ``x`` (B, 1 + K + 1 + D, C), the new state and a :class:`ReductionRecord`.
    """
    B, _, C = x.shape
    M, D = state.num_patches, state.num_dc
    K = keep_pos.shape[1]
    patches = x[:, 1 : 1 + M]
    hf = patches.gather(1, keep_pos[..., None].expand(-1, -1, C))
    lf = patches.gather(1, drop_pos[..., None].expand(-1, -1, C))
    w = weights.gather(1, drop_pos).to(x.dtype)  # (B, L)
    fused = (lf * w[..., None]).sum(dim=1, keepdim=True)  # (B, 1, C)
    new_x = torch.cat([x[:, :1], hf, fused, x[:, 1 + M :]], dim=1)

    with torch.no_grad():
        dc_to = K + 1 + torch.arange(D, device=x.device) if D else None
        old_to_new, source = token_map(
            state, keep_pos, drop_pos, torch.full_like(drop_pos, K), dc_to
        )
        no_cell = state.patch_idx.new_full((B, 1), -1)
        patch_idx = torch.cat([state.patch_idx.gather(1, keep_pos), no_cell], dim=1)
    size = None
    if state.patch_size is not None:
        s = state.patch_size
        size = torch.cat([s.gather(1, keep_pos), s.gather(1, drop_pos).sum(1, keepdim=True)], 1)
    residual = state.residual
    if keep_residual:
        residual = accumulate_residual(state, x[:, 1:], new_x[:, 1:], old_to_new)
    new_state = state.replace(
        source=source, patch_idx=patch_idx, patch_size=size, residual=residual
    )
    record = ReductionRecord(
        kept=patch_idx[:, :K],
        kept_scores=scores.gather(1, keep_pos),
        folded=state.patch_idx.gather(1, drop_pos),
        folded_window=torch.full_like(drop_pos, K),
        source=source,
    )
    return new_x, new_state, record
