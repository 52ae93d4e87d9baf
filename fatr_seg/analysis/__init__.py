"""Cost analysis: MAC counting that sees fused attention, timing and memory helpers.

What this package exports is pure torch (like ``fatr_seg.ops`` and ``fatr_seg.layers``): it
imports no mmseg, mmengine or mmcv, so the trunk can be measured on a machine without them. The
logic of the tools lives in submodules imported by name, which import mmseg and mmengine only
inside the functions that build or run segmentors:

* :mod:`.benchmark`, :mod:`.benchmark_models`, :mod:`.benchmark_report`: ``tools/benchmark.py``;
* :mod:`.flops_report`: ``tools/get_flops.py`` (with :func:`count_macs` and
  :func:`analytic_vit_macs`);
* :mod:`.demo`, :mod:`.demo_report`: ``tools/demo.py``, which picks each step's CPU threads
  with :mod:`.cpu_load`;
* :mod:`.camvid_study`, :mod:`.camvid_runs`, :mod:`.camvid_report`, with :mod:`.budget` (equal-MACs
  budgets, pure torch): ``tools/camvid_study.py``.
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
