#!/usr/bin/env bash
# Multi-process / multi-machine training through torchrun:
#   tools/dist_train.sh CONFIG NPROC [extra train.py args]
# Multi-machine: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on every machine.
set -euo pipefail
CONFIG=$1
NPROC=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --nproc_per_node="$NPROC" --master_port="$PORT" \
    tools/train.py "$CONFIG" --launcher pytorch "$@"
