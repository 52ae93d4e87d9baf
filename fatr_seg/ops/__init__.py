"""Pure torch functions of the method: attention, scoring, selection, aggregation, restoration.

Nothing here imports mmseg, mmengine or mmcv.
"""

from .attention import attention, attention_with_lse, fused_attn_default, reweighted_attention
from .merge import (
    MergePlan,
    bipartite_plan,
    fuse_tokens,
    merge_planned,
    merge_tokens,
    nearest_kept,
    partner_plan,
)
from .precision import float32_matmul
from .reduce import ReductionRecord, accumulate_residual, dc_window_ids, fold_tokens, window_ids
from .restore import restore_tokens
from .scoring import (
    attention_column_mean,
    attention_column_mean_triton,
    hf_scores,
    logit_proxy_score,
    query_rows,
    topk_agreement,
)
from .select import (
    bipartite_scores,
    cls_attention,
    num_keep,
    protected_bipartite_scores,
    select_topk,
)
from .state import TokenState, init_state
from .windows import (
    num_windows,
    window_fold_plan,
    window_fold_scores,
    window_hf_priority,
    window_members,
    window_scores,
    window_similarity,
)

__all__ = [
    "MergePlan",
    "ReductionRecord",
    "TokenState",
    "accumulate_residual",
    "attention",
    "attention_column_mean",
    "attention_column_mean_triton",
    "attention_with_lse",
    "bipartite_plan",
    "bipartite_scores",
    "cls_attention",
    "dc_window_ids",
    "float32_matmul",
    "fold_tokens",
    "fuse_tokens",
    "fused_attn_default",
    "hf_scores",
    "init_state",
    "logit_proxy_score",
    "merge_planned",
    "merge_tokens",
    "nearest_kept",
    "num_keep",
    "num_windows",
    "partner_plan",
    "protected_bipartite_scores",
    "query_rows",
    "restore_tokens",
    "reweighted_attention",
    "select_topk",
    "topk_agreement",
    "window_fold_plan",
    "window_fold_scores",
    "window_hf_priority",
    "window_ids",
    "window_members",
    "window_scores",
    "window_similarity",
]
