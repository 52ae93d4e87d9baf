"""Pure torch functions of the method: attention, scoring, selection, DC aggregation, restoration.

Nothing here imports mmseg, mmengine or mmcv.
"""

from .attention import attention, attention_with_lse, fused_attn_default, reweighted_attention
from .reduce import FoldRecord, fold_tokens, merge_map, num_keep, select_topk, window_ids
from .restore import restore_tokens
from .scoring import (
    attention_column_mean,
    attention_column_mean_triton,
    hf_scores,
    logit_proxy_score,
    topk_agreement,
)
from .state import TokenState, init_state

__all__ = [
    "FoldRecord",
    "TokenState",
    "attention",
    "attention_column_mean",
    "attention_column_mean_triton",
    "attention_with_lse",
    "fold_tokens",
    "fused_attn_default",
    "hf_scores",
    "init_state",
    "logit_proxy_score",
    "merge_map",
    "num_keep",
    "restore_tokens",
    "reweighted_attention",
    "select_topk",
    "topk_agreement",
    "window_ids",
]
