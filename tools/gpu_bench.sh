#!/usr/bin/env bash
# GPU benchmark: ViT-S Segmenter, baseline vs FATR, bf16, batch 32, 512² and 1024² (1024 and 4096
# tokens), backbone and whole segmentor, eager and torch.compile'd, peak memory; writes
# gpu_bench.md (a markdown table) and gpu_bench.json into OUT_DIR.
#
#   tools/gpu_bench.sh [OUT_DIR] [options of python -m fatr_seg.analysis.gpu_bench]
#   tools/gpu_bench.sh work_dirs/gpu_bench --device cpu --dry-run   # the logic, without a GPU
#
# Needs python3 with CUDA torch and timm, nothing built: no mmcv, mmseg or mmengine (the models
# come from fatr_seg.layers alone). PYTHON picks the interpreter. About 5 minutes on an H100/H200
# (most of it compiling); --time-budget (default 420 s) skips the cells that would start later.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT_DIR="${1:-$ROOT/work_dirs/gpu_bench}"
if [ "$#" -gt 0 ]; then shift; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
"$PYTHON" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device visible: {torch.cuda.is_available()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton not installed: the HF score runs on the chunked path")
PY
exec "$PYTHON" -m fatr_seg.analysis.gpu_bench --out-dir "$OUT_DIR" "$@"
