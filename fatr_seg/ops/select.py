"""Token budgets, top-k selection, and the score functions of the peers.

A reduction step splits the patch tokens into kept and dropped ones by a score (higher = keep);
some score functions also propose, for every token, the kept token it would join if dropped
(ToMe's bipartite matching). FATR's own HF score is in :mod:`fatr_seg.ops.scoring`; the local
window scores (FATR's early stage, ALGM's local step) in :mod:`fatr_seg.ops.windows`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .precision import float32_matmul

__all__ = [
    "bipartite_scores",
    "cls_attention",
    "num_keep",
    "protected_bipartite_scores",
    "select_topk",
]


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


@torch.no_grad()
def cls_attention(
    q: torch.Tensor, k: torch.Tensor, scale: float, key_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """EViT's attentiveness: the CLS query's attention to every key, averaged over heads.

    Args:
        q, k: (B, h, n, d); the CLS token is at position 0.
        scale: Logit scale.
        key_bias: Optional (B, n) additive key bias.

    Returns:
        (B, n) float32, each row sums to 1.
    """
    logits = float32_matmul(q[:, :, :1].float(), k.float().transpose(-2, -1)) * scale  # (B,h,1,n)
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :].float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


@torch.no_grad()
def bipartite_scores(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching as a score and a proposed partner.

    As in ToMe's code, the sequence ``[CLS, patches]`` alternates into set A (even sequence
    positions: CLS, which never merges, and the patches at odd positions 1, 3, ...) and set B
    (the patches at even positions 0, 2, ...). Every A patch's partner is its most similar B patch
    (cosine similarity of ``metric``); its score is minus that similarity, so the top-k keeps every
    B patch (score ``+inf``) and the A patches least similar to their partners: dropping the rest
    merges exactly the ``M - k`` most similar edges, as ToMe does (valid while
    ``M - k ≤ floor(M / 2)``).

    Args:
        metric: (B, M, d) similarity features of the patch tokens (ToMe: the keys averaged over
            heads).

    Returns:
        ``scores`` (B, M) float32 and ``partner`` (B, M) long, a position in 0..M-1 (a B patch's
        partner is itself).
    """
    B, M, _ = metric.shape
    a_pos = torch.arange(1, M, 2, device=metric.device)
    b_pos = torch.arange(0, M, 2, device=metric.device)
    partner = torch.arange(M, device=metric.device).expand(B, M).clone()
    scores = torch.full((B, M), float("inf"), device=metric.device)
    if len(a_pos) == 0:
        return scores, partner
    m = F.normalize(metric.float(), dim=-1)
    best, dst = float32_matmul(m[:, a_pos], m[:, b_pos].transpose(1, 2)).max(dim=-1)  # (B, |A|)
    scores[:, a_pos] = -best
    partner[:, a_pos] = b_pos[dst]
    return scores, partner


@torch.no_grad()
def protected_bipartite_scores(
    metric: torch.Tensor, priority: torch.Tensor, num_protected: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite matching among the tokens that are not protected; the protected ones stay.

    The ``num_protected`` tokens of highest ``priority`` (FATR: the HF score) are kept as they
    are: nothing merges into them and they merge into nothing. The others, in sequence order,
    alternate into B (1st, 3rd, ...) and A (2nd, 4th, ...), as ToMe splits its sequence; every A
    token's partner is its most similar B token (cosine similarity of ``metric``), and its score
    is minus that similarity. Protected and B tokens score ``+inf``, so the top-k drops exactly
    the most similar A→B edges (valid while ``M - k ≤ |A|``).

    Args:
        metric: (B, M, d) similarity features of the patch tokens.
        priority: (B, M) protection priority (higher: protected first; ties to the lower
            position).
        num_protected: How many tokens to protect, 0 ≤ P ≤ M.

    Returns:
        ``scores`` (B, M) float32 and ``partner`` (B, M) long positions (a token that is not an
        A token is its own partner).
    """
    B, M, d = metric.shape
    device = metric.device
    protected = torch.zeros(B, M, dtype=torch.bool, device=device)
    if num_protected:
        order = torch.sort(priority.float(), dim=1, descending=True, stable=True).indices
        protected.scatter_(1, order[:, :num_protected], True)
    # Free tokens in sequence order: a stable sort by "protected" keeps their order.
    free_pos = torch.sort(protected.to(torch.int8), dim=1, stable=True).indices[
        :, : M - num_protected
    ]
    a_pos, b_pos = free_pos[:, 1::2], free_pos[:, 0::2]  # (B, |A|), (B, |B|)
    partner = torch.arange(M, device=device).expand(B, M).clone()
    scores = torch.full((B, M), float("inf"), device=device)
    if a_pos.shape[1] == 0:
        return scores, partner
    m = F.normalize(metric.float(), dim=-1)
    ma = m.gather(1, a_pos[..., None].expand(-1, -1, d))
    mb = m.gather(1, b_pos[..., None].expand(-1, -1, d))
    best, dst = float32_matmul(ma, mb.transpose(1, 2)).max(dim=-1)  # (B, |A|)
    scores.scatter_(1, a_pos, -best)
    partner.scatter_(1, a_pos, b_pos.gather(1, dst))
    return scores, partner
