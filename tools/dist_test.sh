#!/usr/bin/env bash
# Multi-process evaluation through torchrun: tools/dist_test.sh CONFIG CHECKPOINT NPROC [args]
# (environment as in tools/dist_launch.sh)
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
shift 3
exec bash "$(dirname "$0")/dist_launch.sh" "$NPROC" tools/test.py "$CONFIG" "$CHECKPOINT" \
    --launcher pytorch "$@"
