#!/usr/bin/env bash
# GPU benchmark: ViT-S Segmenter, baseline vs FATR, bf16, batch 32, 512² and 1024² (1024 and 4096
# tokens), backbone and whole segmentor, eager and torch.compile'd, peak memory; writes
# gpu_bench.md (a markdown table) and gpu_bench.json into OUT_DIR.
#
#   tools/gpu_bench.sh [--tests] [OUT_DIR] [options of python -m fatr_seg.analysis.gpu_bench]
#   tools/gpu_bench.sh work_dirs/gpu_bench --device cpu --dry-run   # the logic, without a GPU
#
# --tests first runs the CUDA tests (pytest -m gpu: the lse kernels, the Triton scoring kernel, the
# whole model on CUDA: CPU's results, no host sync, fullgraph compile, CUDA-graph replay; at most
# GPU_TEST_SECONDS, default 180), logs them to OUT_DIR/gpu_tests.log, then benchmarks whatever
# they gave; the exit status is the tests' if they failed.
#
# Needs python3 with CUDA torch and timm, nothing built: no mmcv, mmseg or mmengine (the models
# come from fatr_seg.layers alone). PYTHON picks the interpreter. On an H200 the eager cells took
# under a minute; compiled cells compile each model once per size (about 60 s a size); --profile
# adds profiles.txt (torch.profiler tables); --time-budget (default 420 s)
# skips the cells that would start later, and every finished cell is written at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TESTS=0
if [ "${1:-}" = "--tests" ]; then TESTS=1; shift; fi
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
TEST_RC=0
if [ "$TESTS" = 1 ]; then
    mkdir -p "$OUT_DIR"
    (cd "$ROOT" && timeout "${GPU_TEST_SECONDS:-180}" "$PYTHON" -m pytest -m gpu -q -rs \
        -p no:cacheprovider tests/test_ops/test_attention_lse_cuda.py \
        tests/test_ops/test_scoring.py tests/test_ops/test_triton_tuning.py \
        tests/test_layers/test_cuda_model.py tests/test_tools/test_gpu_bench_cuda.py) 2>&1 \
        | tee "$OUT_DIR/gpu_tests.log" || TEST_RC=$?
    echo "CUDA tests: exit status $TEST_RC"
fi
"$PYTHON" -m fatr_seg.analysis.gpu_bench --out-dir "$OUT_DIR" "$@"
exit "$TEST_RC"
