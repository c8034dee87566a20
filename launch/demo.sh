#!/usr/bin/env bash
# Demo: write a synthetic Llama-shaped bf16 checkpoint, show the plan, then load it across
# NPROC processes with torchrun (tensor parallel), verify every piece and print the report.
set -euo pipefail
NPROC=${NPROC:-4}
SIZE_MB=${SIZE_MB:-256}
PYTHON=${PYTHON:-python3}
WORK=${DEMO_DIR:-$(mktemp -d -t distload-demo-XXXXXX)}
CKPT="$WORK/llama-${SIZE_MB}mb"

if [ ! -f "$CKPT/model.safetensors.index.json" ]; then
  "$PYTHON" -m distload.cli make-checkpoint "$CKPT" --size-mb "$SIZE_MB" --shard-mb 64
fi
"$PYTHON" -m distload.cli inspect "$CKPT"
echo
"$PYTHON" -m distload.cli plan "$CKPT" --world "$NPROC" --tp "$NPROC"
echo
export OMP_NUM_THREADS=1
PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
"$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "$PORT" \
  -m distload.cli load "$CKPT" --tp "$NPROC" --verify --device cpu
