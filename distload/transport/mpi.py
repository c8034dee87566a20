"""Transport over MPI (mpi4py), for CPU jobs launched by mpirun/mpiexec or srun that do not
want torch.distributed. Runs the same plan with the same results as the torch transport.

Every operation is non-blocking (``Ibcast``, ``Isend``, ``Irecv``, ``Iallreduce``,
``Iallgather``) and polled until ``timeout``, so a dead or stalled peer raises
:class:`~distload.errors.PeerError` naming what this rank was waiting for. After such an
error the communicator cannot be trusted; the launcher should end the job (``mpirun``
does when a rank exits non-zero, ``srun --kill-on-bad-exit=1`` too).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from distload.errors import PeerError

_TAG = 7311  # point-to-point tag used for bucket transfers


class MPITransport:
    """Moves uint8 CPU buffers between the ranks of an MPI communicator."""

    def __init__(self, comm: Any = None, timeout: float = 300.0) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.device = torch.device("cpu")
        self.timeout = timeout
        self.operations = 0

    def _wait(self, request: Any, what: str) -> None:
        self.operations += 1
        deadline = time.monotonic() + self.timeout
        delay = 0.0
        while not request.Test():
            if time.monotonic() > deadline:
                raise PeerError(
                    f"rank {self.rank}: {what}: no answer within {self.timeout:g} s (MPI)",
                    phase=what.split(":", maxsplit=1)[0],
                )
            time.sleep(delay)
            delay = min(0.005, delay + 0.0002)

    @staticmethod
    def _np(buf: torch.Tensor) -> np.ndarray:
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError("MPI transport buffers must be contiguous CPU tensors")
        return buf.view(torch.uint8).numpy()

    def broadcast(self, buf: torch.Tensor, src: int, what: str) -> None:
        self._wait(self.comm.Ibcast(self._np(buf), root=src), what)

    def send(self, buf: torch.Tensor, dst: int, what: str) -> None:
        self._wait(self.comm.Isend(self._np(buf), dest=dst, tag=_TAG), what)

    def recv(self, buf: torch.Tensor, src: int, what: str) -> None:
        self._wait(self.comm.Irecv(self._np(buf), source=src, tag=_TAG), what)

    def all_reduce_max(self, value: int, what: str) -> int:
        send = np.array([value], dtype=np.int64)
        out = np.zeros(1, dtype=np.int64)
        self._wait(self.comm.Iallreduce(send, out, op=self.MPI.MAX), what)
        return int(out[0])

    def all_gather_bytes(self, data: bytes, what: str) -> list[bytes]:
        sizes = np.zeros(self.world_size, dtype=np.int64)
        self._wait(self.comm.Iallgather(np.array([len(data)], dtype=np.int64), sizes), what)
        width = int(sizes.max()) if self.world_size else 0
        if width == 0:
            return [b""] * self.world_size
        mine = np.zeros(width, dtype=np.uint8)
        mine[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        table = np.zeros((self.world_size, width), dtype=np.uint8)
        self._wait(self.comm.Iallgather(mine, table), what)
        return [table[i, : int(n)].tobytes() for i, n in enumerate(sizes)]

    def broadcast_bytes(self, data: bytes | None, src: int, what: str) -> bytes:
        size = np.array([len(data) if data is not None else 0], dtype=np.int64)
        self._wait(self.comm.Ibcast(size, root=src), what)
        n = int(size[0])
        buf = np.zeros(n, dtype=np.uint8)
        if self.rank == src and data is not None:
            buf[:] = np.frombuffer(data, dtype=np.uint8)
        if n:
            self._wait(self.comm.Ibcast(buf, root=src), what)
        return buf.tobytes()

    def open_groups(self, groups: Sequence[tuple[int, ...]], what: str) -> bool:
        # MPI creates sub-communicators with blocking calls that cannot time out, which would
        # break the no-hang guarantee: classes of receivers are served point to point instead
        return False

    def group_broadcast(
        self, buf: torch.Tensor, members: tuple[int, ...], src: int, what: str
    ) -> None:
        raise RuntimeError(f"{what}: the MPI transport opens no sub-groups")

    def close_groups(self) -> None:
        return None
