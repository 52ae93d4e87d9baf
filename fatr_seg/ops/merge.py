"""Aggregation by merging: dropped tokens join a kept token (size-weighted means).

This is the aggregation of ToMe (a dropped token joins its matched partner), of ALGM (a 2×2
window joins one of its tokens) and of fatr_seg's dense default (a low-frequency token joins the
kept token it is most similar to). Unlike DC windows it adds no token, and a merged patch is
restored as a copy of a token that was similar to it, not of a spatial average.

Indices are computed under ``no_grad``; features move with ``gather`` / ``scatter_add``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import float32_matmul
from .reduce import FoldRecord, accumulate_residual, token_map
from .state import TokenState

__all__ = ["fuse_tokens", "merge_tokens", "nearest_kept"]

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


def merge_tokens(
    x: torch.Tensor,
    state: TokenState,
    keep_pos: torch.Tensor,
    drop_pos: torch.Tensor,
    dst: torch.Tensor,
    scores: torch.Tensor,
    keep_residual: bool = False,
    prop_attn: bool = True,
) -> tuple[torch.Tensor, TokenState, FoldRecord]:
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
        ``x`` (B, 1 + K + D, C), the new state and a :class:`FoldRecord` (``folded_window`` =
        the new position of the token each dropped token joined).
    """
    B, _, C = x.shape
    M, D = state.num_patches, state.num_dc
    K = keep_pos.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    size = state.sizes().to(acc)  # (B, M)
    patches = x[:, 1 : 1 + M]
    hf = patches.gather(1, keep_pos[..., None].expand(-1, -1, C))
    lf = patches.gather(1, drop_pos[..., None].expand(-1, -1, C))
    s_keep, s_drop = size.gather(1, keep_pos), size.gather(1, drop_pos)
    sums = (hf.to(acc) * s_keep[..., None]).scatter_add(
        1, dst[..., None].expand(-1, -1, C), lf.to(acc) * s_drop[..., None]
    )
    new_size = s_keep.scatter_add(1, dst, s_drop)  # (B, K)
    merged = (sums / new_size[..., None]).to(x.dtype)
    new_x = torch.cat([x[:, :1], merged, x[:, 1 + M :]], dim=1)

    with torch.no_grad():
        dc_to = K + torch.arange(D, device=x.device) if D else None
        old_to_new, source = token_map(state, keep_pos, drop_pos, dst, dc_to)
        patch_idx = state.patch_idx.gather(1, keep_pos)
    residual = state.residual
    if keep_residual:
        residual = accumulate_residual(state, x[:, 1:], new_x[:, 1:], old_to_new)

    new_state = state.replace(
        source=source,
        patch_idx=patch_idx,
        patch_size=new_size.float(),
        residual=residual,
        prop_attn=prop_attn,
    )
    record = FoldRecord(
        kept=patch_idx,
        kept_scores=scores.gather(1, keep_pos),
        folded=state.patch_idx.gather(1, drop_pos),
        folded_window=dst,
        source=source,
    )
    return new_x, new_state, record


def fuse_tokens(
    x: torch.Tensor,
    state: TokenState,
    keep_pos: torch.Tensor,
    drop_pos: torch.Tensor,
    weights: torch.Tensor,
    scores: torch.Tensor,
    keep_residual: bool = False,
) -> tuple[torch.Tensor, TokenState, FoldRecord]:
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
        ``x`` (B, 1 + K + 1 + D, C), the new state and a :class:`FoldRecord`.
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
    record = FoldRecord(
        kept=patch_idx[:, :K],
        kept_scores=scores.gather(1, keep_pos),
        folded=state.patch_idx.gather(1, drop_pos),
        folded_window=torch.full_like(drop_pos, K),
        source=source,
    )
    return new_x, new_state, record
