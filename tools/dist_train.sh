#!/usr/bin/env bash
# Multi-process / multi-machine training through torchrun:
#   tools/dist_train.sh CONFIG NPROC [extra train.py args]
# Multi-machine: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on every machine
# (see tools/dist_launch.sh).
set -euo pipefail
CONFIG=$1
NPROC=$2
shift 2
exec bash "$(dirname "$0")/dist_launch.sh" "$NPROC" tools/train.py "$CONFIG" --launcher pytorch "$@"
