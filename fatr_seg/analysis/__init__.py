"""Measurement: an importable API, and the back-ends of the command-line experiments.

**The measurement API**, exported here, is pure torch (like ``fatr_seg.ops`` and
``fatr_seg.layers``), so a trunk can be measured anywhere: MACs that see fused attention and the
reducers' gathers (:mod:`.flops`); time and memory (:mod:`.timing`); rank collapse
per block (:mod:`.rank_collapse`); reducers at equal MACs (:mod:`.budget`); the results store
(:mod:`.store`) and the one table helper, which also renders README/docs tables from
``results/`` (:mod:`.tables`).

**The experiments' back-ends** are the logic of the tools, not exported (each tool imports its
own; mmseg and mmengine only inside the functions that build or run segmentors):
:mod:`.benchmark` (the benchmark core of the CPU and GPU benchmarks, and ``tools/benchmark.py``)
with :mod:`.benchmark_models` and :mod:`.benchmark_report`; :mod:`.gpu_bench`
(``tools/gpu_bench.sh``); :mod:`.flops_report` (``tools/get_flops.py``); :mod:`.demo`,
:mod:`.demo_report` (``tools/demo.py``); :mod:`.camvid_study`, :mod:`.camvid_runs`,
:mod:`.camvid_report` (``tools/camvid_study.py``).
"""

from .budget import MatchedBudget, ViTShape, match_budget
from .flops import (
    BlockTokens,
    MacReport,
    analytic_vit_macs,
    attention_flops,
    count_macs,
    flop_formulas,
    token_schedule,
)
from .rank_collapse import LayerDiagnostics, layer_diagnostics
from .store import Store, write_json
from .timing import (
    TimingStats,
    cuda_peak_memory,
    current_rss_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    synchronize,
    time_alternating,
)

__all__ = ["BlockTokens", "LayerDiagnostics", "MacReport", "MatchedBudget", "Store",
           "TimingStats", "ViTShape", "analytic_vit_macs", "attention_flops", "count_macs",
           "cuda_peak_memory", "current_rss_bytes", "flop_formulas", "layer_diagnostics",
           "match_budget", "peak_rss_bytes", "reset_peak_rss", "synchronize", "time_alternating",
           "token_schedule", "write_json"]  # fmt: skip
