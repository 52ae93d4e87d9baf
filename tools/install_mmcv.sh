#!/usr/bin/env bash
# Build (or reuse) an mmcv wheel with compiled ops for the torch that is installed.
#
# mmcv 2.1.0 (the version mmsegmentation 1.2.2 accepts) ships only as source for recent torch.
# Two things stop its setup.py on torch >= 2.10 and recent setuptools:
#   * it hard-codes `-std=c++17`, but torch's headers now need C++20;
#   * it imports `pkg_resources` (setuptools < 81 still has it; requirements/build.txt pins that).
# The built wheel is cached under ~/.cache/fatr_seg/wheels/, keyed by mmcv version, torch version,
# ops flavour (cpu/cuda) and Python tag, so a second install takes seconds.
#
# Usage: tools/install_mmcv.sh [PYTHON]    (default: .venv/bin/python)
# Env:   MMCV_VERSION (2.1.0), MAX_JOBS (nproc), FATR_WHEEL_CACHE (~/.cache/fatr_seg/wheels),
#        MMCV_CXXFLAGS (-g0 -O1: no debug info, light optimisation; see docs/install.md, "Troubleshooting the mmcv build").
#        CUDA_VISIBLE_DEVICES= forces a CPU-only build on a machine with a GPU;
#        FORCE_CUDA=1 builds CUDA ops without a visible GPU (needs nvcc).
set -euo pipefail

PY=${1:-.venv/bin/python}
# The build runs in a temporary directory: keep the interpreter path valid there.
case "$PY" in /*) ;; */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
MMCV_VERSION=${MMCV_VERSION:-2.1.0}
CACHE=${FATR_WHEEL_CACHE:-$HOME/.cache/fatr_seg/wheels}
JOBS=${MAX_JOBS:-$(nproc)}
CXXFLAGS_EXTRA=${MMCV_CXXFLAGS:--g0 -O1}

log() { printf '[install_mmcv] %s\n' "$*"; }

if "$PY" - "$MMCV_VERSION" <<'PYEOF' 2>/dev/null; then
import sys, mmcv, mmcv.ops  # noqa: F401
sys.exit(0 if mmcv.__version__ == sys.argv[1] else 1)
PYEOF
    log "mmcv $MMCV_VERSION with compiled ops already installed"
    exit 0
fi

# Key: torch version (includes +cuXXX/+cpu), whether CUDA ops will be built, Python tag.
read -r TORCH_VER OPS PYTAG < <("$PY" - <<'PYEOF'
import os, sys, torch
cuda = torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"
print(torch.__version__, "cuda" if cuda else "cpu", f"cp{sys.version_info[0]}{sys.version_info[1]}")
PYEOF
)
KEY_DIR="$CACHE/mmcv-$MMCV_VERSION/torch-$TORCH_VER-$OPS/$PYTAG"
mkdir -p "$KEY_DIR"
WHEEL=$(ls "$KEY_DIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)

if [ -z "$WHEEL" ]; then
    log "no cached wheel in $KEY_DIR: building mmcv $MMCV_VERSION ($OPS ops) for torch $TORCH_VER"
    log "this is a cold build: about 20-25 minutes on 2 cores; progress below as [done/total]"
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    # Locate the sdist through the package index's JSON API (pip download would try to build it).
    "$PY" - "$MMCV_VERSION" "$WORK" <<'PYEOF'
import hashlib, json, sys, urllib.request
version, work = sys.argv[1], sys.argv[2]
name = f"mmcv-{version}.tar.gz"
req = urllib.request.Request("https://pypi.org/simple/mmcv/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(req, timeout=120) as r:
    files = json.load(r)["files"]
entry = next((f for f in files if f["filename"] == name), None)
if entry is None:
    sys.exit(f"[install_mmcv] {name} not found on the package index")
with urllib.request.urlopen(entry["url"], timeout=600) as r:
    data = r.read()
if hashlib.sha256(data).hexdigest() != entry["hashes"]["sha256"]:
    sys.exit(f"[install_mmcv] sha256 mismatch for {name}")
with open(f"{work}/{name}", "wb") as f:
    f.write(data)
PYEOF
    tar xzf "$WORK/mmcv-$MMCV_VERSION.tar.gz" -C "$WORK"
    SRC="$WORK/mmcv-$MMCV_VERSION"
    # torch >= 2.10 headers use C++20 features.
    sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
    grep -q 'c++20' "$SRC/setup.py" || { log "could not patch the C++ standard in setup.py"; exit 1; }
    START=$(date +%s)
    # CFLAGS are appended after Python's own (-g -O3), so they win; ninja runs MAX_JOBS compilers.
    (cd "$SRC" && MMCV_WITH_OPS=1 MAX_JOBS="$JOBS" CFLAGS="$CXXFLAGS_EXTRA" \
        "$PY" -m pip wheel --no-build-isolation --no-deps -v -w "$WORK/dist" . \
        > "$WORK/build.log" 2>&1) &
    BUILD_PID=$!
    # Show ninja's [done/total] counter while the compiler runs.
    while kill -0 "$BUILD_PID" 2>/dev/null; do
        sleep 30
        STEP=$(grep -o '\[[0-9]*/[0-9]*\]' "$WORK/build.log" 2>/dev/null | tail -n1 || true)
        log "compiling ${STEP:-(configuring)} after $(( $(date +%s) - START ))s"
    done
    if ! wait "$BUILD_PID"; then
        cp "$WORK/build.log" "$CACHE/mmcv-build-failed.log"
        tail -n 40 "$CACHE/mmcv-build-failed.log"
        log "build failed; full log: $CACHE/mmcv-build-failed.log (docs/install.md: Troubleshooting the mmcv build)"
        exit 1
    fi
    cp "$WORK"/dist/mmcv-"$MMCV_VERSION"-*.whl "$KEY_DIR"/
    WHEEL=$(ls "$KEY_DIR"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)
    log "built in $(( $(date +%s) - START ))s, cached at $WHEEL"
else
    log "reusing cached wheel $WHEEL"
fi

"$PY" -m pip install --no-deps --force-reinstall "$WHEEL"
"$PY" -c "import mmcv, mmcv.ops; print('[install_mmcv] mmcv', mmcv.__version__, 'ops OK')"
