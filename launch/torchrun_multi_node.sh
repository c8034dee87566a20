#!/usr/bin/env bash
# Load a checkpoint across NNODES nodes: run this once on every node. torchrun's c10d
# rendezvous on RDZV_HOST:RDZV_PORT assigns node ranks; RDZV_ID must be the same on all nodes.
#
#   NNODES=2 RDZV_HOST=node01 launch/torchrun_multi_node.sh /ckpts/llama --tp 8
set -euo pipefail
CKPT=${1:?usage: NNODES=N RDZV_HOST=host $0 CKPT [args...]}
shift
PYTHON=${PYTHON:-python3}
NNODES=${NNODES:?set NNODES}
RDZV_HOST=${RDZV_HOST:?set RDZV_HOST (the first node)}
RDZV_PORT=${RDZV_PORT:-29500}
RDZV_ID=${RDZV_ID:-distload}
NODE_RANK_ARGS=()
[ -n "${NODE_RANK:-}" ] && NODE_RANK_ARGS=(--node-rank "$NODE_RANK")
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TARGET=(-m distload.cli load "$CKPT" --verify)
[ -n "${SCRIPT:-}" ] && TARGET=("$SCRIPT" "$CKPT")
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  "${NODE_RANK_ARGS[@]}" --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" \
  --rdzv-id "$RDZV_ID" "${TARGET[@]}" "$@"
