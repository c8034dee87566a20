#!/usr/bin/env bash
# Load a checkpoint on one node: NPROC processes started by torchrun (c10d rendezvous on a
# free local port). Runs `distload load CKPT --verify ARGS...`, or SCRIPT with CKPT ARGS...
#
#   launch/torchrun_single_node.sh /ckpts/llama --tp 4
#   NPROC=8 SCRIPT=train.py launch/torchrun_single_node.sh /ckpts/llama --lr 1e-4
set -euo pipefail
CKPT=${1:?usage: $0 CKPT [args...]}
shift
PYTHON=${PYTHON:-python3}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -n "${SCRIPT:-}" ]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$SCRIPT" "$CKPT" "$@"
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  -m distload.cli load "$CKPT" --verify "$@"
