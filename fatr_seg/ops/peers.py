"""Peer token-reduction methods as pure functions, on FATR's state and source map.

Written from the papers (EViT, ICLR 2022; ToMe, ICLR 2023), not from their code. Both share
fatr_seg's :class:`TokenState`, so restoration, benchmarks and FLOP counting are the same as
for FATR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reduce import FoldRecord
from .state import TokenState

__all__ = ["cls_attention", "tome_merge"]


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
    logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1)) * scale  # (B, h, 1, n)
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :].float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def tome_merge(
    x: torch.Tensor, state: TokenState, metric: torch.Tensor, keep: int
) -> tuple[torch.Tensor, TokenState, FoldRecord]:
    """Bipartite soft matching: merge ``M - keep`` patch tokens into their most similar partner.

    Patch tokens alternate into sets A (even positions) and B (odd positions). Every A token
    proposes its most similar B token (cosine similarity of ``metric``, ToMe uses the keys
    averaged over heads); the ``r = M - keep`` most similar proposals merge, each A token into its
    B partner, as size-weighted means. CLS is protected. Sizes are kept in ``state.patch_size``
    (proportional attention adds ``log(size)`` to the keys in later blocks); the source map sends
    every merged patch to its destination, so restoration is the same gather as FATR's.

    Args:
        x: (B, 1 + M, C) ``[CLS, patch tokens]`` (no DC tokens: ToMe has none).
        state: Sequence state with M patch tokens.
        metric: (B, M, d) similarity features of the patch tokens.
        keep: Patch tokens left after merging; ``M - keep`` must not exceed ``ceil(M / 2)``.

    Returns:
        ``x`` (B, 1 + keep, C), the new state and a :class:`FoldRecord` (``folded`` = merged
        patches, ``folded_window`` = the new position of the token each merged into).
    """
    B, _, C = x.shape
    M = state.num_patches
    if state.num_dc:
        raise ValueError("tome_merge expects a sequence without DC tokens")
    r = M - keep
    a_pos = torch.arange(0, M, 2, device=x.device)
    b_pos = torch.arange(1, M, 2, device=x.device)
    if r > len(a_pos) or len(b_pos) == 0:
        raise ValueError(
            f"ToMe can merge at most {len(a_pos)} of {M} tokens in one step (asked {r}); "
            "use keep_ratio >= 0.5"
        )
    with torch.no_grad():
        m = F.normalize(metric.float(), dim=-1)
        sim = m[:, a_pos] @ m[:, b_pos].transpose(1, 2)  # (B, |A|, |B|)
        best, dst = sim.max(dim=-1)  # (B, |A|)
        order = torch.sort(best, dim=1, descending=True, stable=True).indices
        src_a, unm_a = order[:, :r].sort(1).values, order[:, r:].sort(1).values  # into A
        dst_b = dst.gather(1, src_a)  # (B, r) into B
        n_unm = unm_a.shape[1]

    size = (
        torch.ones(B, M, device=x.device) if state.patch_size is None else state.patch_size
    ).float()
    patches = x[:, 1:]
    xa, xb = patches[:, a_pos], patches[:, b_pos]
    sa, sb = size[:, a_pos], size[:, b_pos]
    sa_src = sa.gather(1, src_a)
    # Size-weighted means: sum size·x into each B token, then divide by the total size.
    src_x = xa.float().gather(1, src_a[..., None].expand(-1, -1, C)) * sa_src[..., None]
    wsum_b = (xb.float() * sb[..., None]).scatter_add(1, dst_b[..., None].expand(-1, -1, C), src_x)
    size_b = sb.scatter_add(1, dst_b, sa_src)
    merged_b = (wsum_b / size_b[..., None]).to(x.dtype)
    x_unm = xa.gather(1, unm_a[..., None].expand(-1, -1, C))
    x = torch.cat([x[:, :1], x_unm, merged_b], dim=1)

    with torch.no_grad():
        # Old patch position -> new position ([unmerged A..., all B...]).
        old_to_new = torch.empty(B, M, dtype=torch.long, device=x.device)
        a_idx, b_idx = a_pos.expand(B, -1), b_pos.expand(B, -1)
        old_to_new.scatter_(
            1, a_idx.gather(1, unm_a), torch.arange(n_unm, device=x.device).expand(B, -1)
        )
        old_to_new.scatter_(
            1, b_idx, n_unm + torch.arange(len(b_pos), device=x.device).expand(B, -1)
        )
        old_to_new.scatter_(1, a_idx.gather(1, src_a), n_unm + dst_b)
        source = old_to_new.gather(1, state.source)
        pidx_a, pidx_b = state.patch_idx[:, a_pos], state.patch_idx[:, b_pos]
        patch_idx = torch.cat([pidx_a.gather(1, unm_a), pidx_b], dim=1)
        new_size = torch.cat([sa.gather(1, unm_a), size_b], dim=1)
        record = FoldRecord(
            kept=patch_idx,
            kept_scores=torch.zeros_like(patch_idx, dtype=torch.float32),
            folded=pidx_a.gather(1, src_a),
            folded_window=n_unm + dst_b,
            source=source,
        )
    return x, state.replace(source=source, patch_idx=patch_idx, patch_size=new_size), record
