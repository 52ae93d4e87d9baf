#!/usr/bin/env bash
# torchrun for tools/dist_train.sh and tools/dist_test.sh:
#   tools/dist_launch.sh NPROC SCRIPT [SCRIPT args]   (SCRIPT relative to the repository root)
# Multi-machine: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on every machine.
# PYTHON=.venv/bin/python picks the interpreter (default: python on the PATH).
set -euo pipefail
NPROC=$1
shift
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$NPROC" --master_port="${PORT:-29500}" "$@"
