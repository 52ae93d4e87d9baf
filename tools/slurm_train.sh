#!/usr/bin/env bash
# SLURM training: tools/slurm_train.sh PARTITION JOB_NAME CONFIG [GPUS] [extra train.py args]
# PYTHON=.venv/bin/python picks the interpreter (default: python on the PATH).
set -euo pipefail
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
GPUS=${4:-8}
shift $(( $# > 3 ? 4 : 3 ))
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
cd "$(dirname "$0")/.."
srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
    ${SRUN_ARGS:-} "${PYTHON:-python}" -u tools/train.py "$CONFIG" --launcher slurm "$@"
