"""Cost analysis: MAC counting that sees fused attention, timing and memory helpers.

Pure torch (like ``fatr_seg.ops`` and ``fatr_seg.layers``): nothing here imports mmseg, mmengine
or mmcv, so the trunk can be measured on a machine without them. The command-line tools are
``tools/get_flops.py`` and ``tools/benchmark.py``.
"""

from .flops import (
    BlockTokens,
    MacReport,
    analytic_vit_macs,
    attention_flops,
    count_macs,
    flop_formulas,
    token_schedule,
)
from .timing import (
    TimingStats,
    attention_stats_at,
    cuda_peak_memory,
    current_rss_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    synchronize,
    time_alternating,
    time_scoring_paths,
)

__all__ = [
    "BlockTokens",
    "MacReport",
    "TimingStats",
    "analytic_vit_macs",
    "attention_flops",
    "attention_stats_at",
    "count_macs",
    "cuda_peak_memory",
    "current_rss_bytes",
    "flop_formulas",
    "peak_rss_bytes",
    "reset_peak_rss",
    "synchronize",
    "time_alternating",
    "time_scoring_paths",
    "token_schedule",
]
