"""Shared-memory exchange for ranks on one node: one read, every local rank copies its slices.

When every rank of the load runs on the same node and destinations are in host memory, a
reader reads each shared bucket (broadcast or point to point) into a slot of its own
shared-memory file (``/dev/shm``); after the bucket's status check -- the collective that
already precedes every shared bucket -- each rank copies its parts straight out of that slot
into its destinations. No packing, no socket copies, no receive buffers.

Slot discipline (deterministic on every rank, so nothing is exchanged): the reader's ``k``-th
shared bucket uses slot ``k % SLOTS``. A slot is given back to the reader only after the
status check of a *later* shared bucket, which every rank enters only after finishing the
earlier bucket's copies, so a slot is never overwritten while a peer reads it.

Files are named ``distload-<plan token>-<rank>-<slot>``. Every rank creates its files, all
ranks agree, every rank maps every peer's slots (:meth:`ShmExchange.attach`), all ranks agree
again, and then each rank unlinks its own files: from then on the memory lives only in the
mappings, so nothing is left in ``/dev/shm`` even when the whole job is killed mid-load. A load
that fails during that set-up removes every rank's files of that load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import torch

from distload.geometry import read_bytes
from distload.plan import LoadPlan

log = logging.getLogger(__name__)

SLOTS = 2


def shm_dir() -> Path:
    """``DISTLOAD_SHM_DIR`` if set, else ``/dev/shm`` where it exists (tmpfs), else the
    temporary folder."""
    chosen = os.environ.get("DISTLOAD_SHM_DIR")
    if chosen:
        return Path(chosen)
    path = Path("/dev/shm")
    return path if path.is_dir() and os.access(path, os.W_OK) else Path(tempfile.gettempdir())


def slot_sizes(plan: LoadPlan) -> dict[int, int]:
    """Bytes of one slot of each reader: its largest shared bucket's read layout."""
    sizes: dict[int, int] = {}
    for bucket in plan.buckets:
        if bucket.kind != "local":
            size = read_bytes(plan, bucket)
            sizes[bucket.reader] = max(size, sizes.get(bucket.reader, 0))
    return sizes


class ShmExchange:
    """This rank's shared-memory slots, and read-only views of its peers' slots."""

    def __init__(self, plan: LoadPlan, rank: int, *, folder: Path | None = None) -> None:
        self.plan, self.rank = plan, rank
        self.folder = folder or shm_dir()
        self.token = plan.token or "0"
        self._own: dict[str, torch.Tensor] = {}
        self._peers: dict[tuple[int, str], torch.Tensor] = {}
        self.slot_of: dict[int, str] = {}  # bucket index -> slot name, for every shared bucket
        counts: dict[int, int] = {}
        for number, bucket in enumerate(plan.buckets):
            if bucket.kind == "local":
                continue
            k = counts.get(bucket.reader, 0)
            counts[bucket.reader] = k + 1
            self.slot_of[number] = f"shm{k % SLOTS}"
        self.slot_bytes = slot_sizes(plan)  # reader -> bytes of each of its slots
        size = self.slot_bytes.get(rank, 0)
        if size:
            for i in range(SLOTS):
                self._own[f"shm{i}"] = self._create(f"shm{i}", size)

    def path(self, rank: int, slot: str) -> Path:
        return self.folder / f"distload-{self.token}-{rank}-{slot}"

    def _create(self, slot: str, size: int) -> torch.Tensor:
        path = self.path(self.rank, slot)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)

    def own(self, slot: str, nbytes: int) -> torch.Tensor:
        """This rank's slot as a uint8 tensor of ``nbytes`` (the reader writes into it)."""
        return self._own[slot][:nbytes]

    def attach(self) -> None:
        """Map every peer's slots (all ranks, after every rank has created its files)."""
        for reader, size in self.slot_bytes.items():
            if reader == self.rank or not size:
                continue
            for i in range(SLOTS):
                path = str(self.path(reader, f"shm{i}"))
                view = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
                self._peers[(reader, f"shm{i}")] = view

    def unlink_own(self) -> None:
        """Remove this rank's files once every peer has mapped them (mappings stay valid)."""
        for i in range(SLOTS):
            with contextlib.suppress(FileNotFoundError):
                self.path(self.rank, f"shm{i}").unlink()

    def peer(self, reader: int, slot: str, nbytes: int) -> torch.Tensor:
        """A view of ``reader``'s slot (mapped by :meth:`attach`)."""
        return self._peers[(reader, slot)][:nbytes]

    @property
    def nbytes(self) -> int:
        """Shared memory this rank holds (its own slots)."""
        return sum(t.numel() for t in self._own.values())

    def close(self, *, purge: bool = False) -> None:
        """Drop every mapping and remove this rank's files; with ``purge`` (after a failed
        load, when a peer may have died without cleaning up) every rank's files of this load."""
        self._peers.clear()
        self._own.clear()
        owners = range(self.plan.world_size) if purge else (self.rank,)
        for rank in owners:
            for i in range(SLOTS):
                with contextlib.suppress(FileNotFoundError):
                    self.path(rank, f"shm{i}").unlink()
