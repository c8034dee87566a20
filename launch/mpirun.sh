#!/usr/bin/env bash
# Load a checkpoint with NP MPI ranks. TRANSPORT=mpi moves data with mpi4py (no
# torch.distributed); TRANSPORT=torch (default) uses gloo/NCCL with a rendezvous agreed over MPI.
#
#   NP=4 launch/mpirun.sh /ckpts/llama --tp 4
#   NP=4 TRANSPORT=mpi launch/mpirun.sh /ckpts/llama --tp 4
set -euo pipefail
CKPT=${1:?usage: NP=N $0 CKPT [args...]}
shift
PYTHON=${PYTHON:-python3}
NP=${NP:-2}
TRANSPORT=${TRANSPORT:-torch}
MPIEXEC=${MPIEXEC:-mpiexec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -n "${SCRIPT:-}" ]; then
  exec "$MPIEXEC" -n "$NP" "$PYTHON" "$SCRIPT" "$CKPT" "$@"
fi
DEVICE=()
[ "$TRANSPORT" = mpi ] && DEVICE=(--device cpu)
exec "$MPIEXEC" -n "$NP" "$PYTHON" -m distload.cli load "$CKPT" --verify \
  --transport "$TRANSPORT" "${DEVICE[@]}" "$@"
