"""A load in which one rank dies (SIGKILL) in the middle of the transfers.

Run under a launcher: ``python tests/launchers/crash_load.py CKPT [--transport mpi]``. The
victim (rank 1) kills itself at its third bucket; every other rank must fail with a clear
PeerError (printed, exit code 3) instead of hanging, unless the launcher ends it first.
"""

from __future__ import annotations

import os
import signal
import sys

import distload
from distload import execute


def main() -> int:
    ckpt = sys.argv[1]
    transport = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--transport" else "auto"
    rank = int(
        os.environ.get("RANK") or os.environ.get("PMI_RANK") or os.environ.get("SLURM_PROCID") or 0
    )
    if rank == 1:
        original = execute.Executor._step
        count = {"n": 0}

        def step(self, number, bucket, prefetch):  # type: ignore[no-untyped-def]
            count["n"] += 1
            if count["n"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, number, bucket, prefetch)

        execute.Executor._step = step  # type: ignore[method-assign]
    try:
        distload.load(
            ckpt,
            distload.TensorParallel(distload.preset("llama")),
            device="cpu",
            bucket_bytes=20_000,
            timeout=10,
            transport=transport,
        )
    except distload.DistLoadError as exc:
        sys.stderr.write(f"rank {rank}: {type(exc).__name__}: {exc}\n")
        return 3
    sys.stderr.write(f"rank {rank}: load finished although a peer died\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
