"""Shared-memory exchange for ranks on one node: one read, every local rank copies its slices.

When every rank of the load runs on the same node and destinations are in host memory, a
reader reads each shared bucket (broadcast or point to point) into a slot of its own
shared-memory file (``/dev/shm``) and *publishes* it; each rank copies its parts straight out
of that slot into its destinations as soon as it is published, then marks the bucket *done*.
No packing, no socket copies, no receive buffers, and no collective per bucket: readers run
ahead of their peers by up to ``SLOTS`` shared buckets each.

Every rank also owns a small control file of int64 words:

* word 0: the rank's process id (so peers notice it died while they wait on it);
* word 1: non-zero once it left the load with an error: a bit for each rank that error
  blames (its own when it failed itself), so a peer waiting on it passes the blame on;
* words 2 and 3: the ranks its main thread and its reader thread wait on right now (a bit
  each), so a rank that times out names the rank at the end of the chain of waits -- the one
  that stalled -- rather than a peer that waits on it too;
* ``4 + s``: what the rank, as a reader, last published in slot ``s``: ``n + 1`` once bucket
  ``n`` is in the slot, ``-(n + 1)`` when reading bucket ``n`` failed (the reader shares its
  error at the next status check; peers skip the copies meanwhile);
* ``4 + SLOTS + s * world + r``: ``n + 1`` once rank ``r`` is done with bucket ``n`` of this
  reader's slot ``s`` (every rank marks every shared bucket of the plan, copies or not).

Each word has one writer. Slot discipline (deterministic on every rank, so nothing is
exchanged): the reader's ``k``-th shared bucket uses slot ``k % SLOTS``; the reader refills a
slot only once every rank, itself included, is done with the bucket it held. Every wait polls
with a growing pause, notices a peer that died or aborted within ``PROBE_SECONDS`` and gives
up after the load's timeout with a :class:`~distload.errors.PeerError` naming the ranks it
waited on.

Files are named ``distload-<plan token>-<rank>-<slot>`` (``ctl`` for the control file). Every
rank creates its files, all ranks agree, every rank maps every peer's files
(:meth:`ShmExchange.attach`), all ranks agree again, and then each rank unlinks its own files:
from then on the memory lives only in the mappings, so nothing is left in ``/dev/shm`` even
when the whole job is killed mid-load. A load that fails during that set-up removes every
rank's files of that load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from distload.errors import Failure, PeerError
from distload.geometry import read_bytes
from distload.plan import LoadPlan

log = logging.getLogger(__name__)

SLOTS = 2
PROBE_SECONDS = 0.05  # how often a wait looks for dead or aborted peers
_PID, _ABORT, _WAIT_MAIN, _WAIT_READER, _HEAD = 0, 1, 2, 3, 4  # control words, then slots'


def shm_dir() -> Path:
    """``DISTLOAD_SHM_DIR`` if set, else ``/dev/shm`` where it exists (tmpfs), else the
    temporary folder."""
    chosen = os.environ.get("DISTLOAD_SHM_DIR")
    if chosen:
        return Path(chosen)
    path = Path("/dev/shm")
    return path if path.is_dir() and os.access(path, os.W_OK) else Path(tempfile.gettempdir())


def slot_sizes(plan: LoadPlan, cached: frozenset[int]) -> dict[int, int]:
    """Bytes of one slot of each reader: its largest shared bucket's read layout (``cached``:
    the page-cached buckets, which use no slot)."""
    sizes: dict[int, int] = {}
    for number, bucket in enumerate(plan.buckets):
        if bucket.kind != "local" and number not in cached:
            size = read_bytes(plan, bucket)
            sizes[bucket.reader] = max(size, sizes.get(bucket.reader, 0))
    return sizes


_ORDER = threading.Lock()


def _fence() -> None:
    """A full memory barrier between a slot's bytes and its control word: two lock round
    trips (release, then acquire) on this CPU. x86 orders these stores and loads anyway;
    weaker memory models (arm64) need it."""
    for _ in range(2):
        with _ORDER:
            pass


def _mask(ranks: Sequence[int]) -> int:
    return sum(1 << r for r in set(ranks))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (not gone, not a zombie); True when it cannot be told."""
    if pid <= 0:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


class ShmExchange:
    """This rank's shared-memory slots and control words, and views of its peers'.

    Every rank of the load holds one; the reader thread of a rank publishes into its own
    slots, the main thread copies out of peers' slots and marks buckets done."""

    def __init__(
        self, plan: LoadPlan, rank: int, *, folder: Path | None = None, timeout: float = 300.0
    ) -> None:
        self.plan, self.rank, self.timeout = plan, rank, timeout
        self.world = plan.world_size
        self.folder = folder or shm_dir()
        self.token = plan.token or "0"
        self._own: dict[str, torch.Tensor] = {}
        self._peers: dict[tuple[int, str], torch.Tensor] = {}
        self._ctl: dict[int, np.ndarray] = {}  # rank -> its control words (own and mapped)
        self._maps: list[torch.Tensor] = []  # keeps the control mappings alive
        self._pids: dict[int, int] = {}  # peer -> its process id where this rank can see it
        self.slot_of: dict[int, str] = {}  # bucket index -> slot name, for every shared bucket
        self.previous: dict[int, int] = {}  # bucket index -> the bucket its slot held before
        counts: dict[int, int] = {}
        last: dict[tuple[int, str], int] = {}
        self.cached = plan.cached_buckets()  # copied from the page cache: no slot
        for number, bucket in enumerate(plan.buckets):
            if bucket.kind == "local" or number in self.cached:
                continue
            k = counts.get(bucket.reader, 0)
            counts[bucket.reader] = k + 1
            slot = f"shm{k % SLOTS}"
            self.slot_of[number] = slot
            before = last.get((bucket.reader, slot))
            if before is not None:
                self.previous[number] = before
            last[(bucket.reader, slot)] = number
        self.slot_bytes = slot_sizes(plan, self.cached)  # reader -> bytes of one of its slots
        self.ctl_words = _HEAD + SLOTS + SLOTS * self.world
        size = self.slot_bytes.get(rank, 0)
        if size:
            for i in range(SLOTS):
                self._own[f"shm{i}"] = self._create(f"shm{i}", size)
        self._ctl[rank] = self._map_ctl(self._create("ctl", 8 * self.ctl_words))
        self._ctl[rank][_PID] = os.getpid()

    def path(self, rank: int, slot: str) -> Path:
        return self.folder / f"distload-{self.token}-{rank}-{slot}"

    def _names(self) -> list[str]:
        return [f"shm{i}" for i in range(SLOTS)] + ["ctl"]

    def _create(self, slot: str, size: int) -> torch.Tensor:
        path = self.path(self.rank, slot)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)

    def _map_ctl(self, raw: torch.Tensor) -> np.ndarray:
        self._maps.append(raw)
        return raw.numpy().view(np.int64)

    def own(self, slot: str, nbytes: int) -> torch.Tensor:
        """This rank's slot as a uint8 tensor of ``nbytes`` (the reader writes into it)."""
        return self._own[slot][:nbytes]

    def attach(self) -> None:
        """Map every peer's slots and control words (all ranks, after every rank has created
        its files)."""
        for peer in range(self.world):
            if peer == self.rank:
                continue
            path = str(self.path(peer, "ctl"))
            raw = torch.from_file(path, shared=True, size=8 * self.ctl_words, dtype=torch.uint8)
            self._ctl[peer] = self._map_ctl(raw)
            # every peer runs now; one whose process this rank cannot see (another process
            # namespace) is watched through its abort word and the timeout only
            pid = int(self._ctl[peer][_PID])
            if pid > 0 and os.path.exists(f"/proc/{pid}"):
                self._pids[peer] = pid
        for reader, size in self.slot_bytes.items():
            if reader == self.rank or not size:
                continue
            for i in range(SLOTS):
                path = str(self.path(reader, f"shm{i}"))
                view = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
                self._peers[(reader, f"shm{i}")] = view

    def unlink_own(self) -> None:
        """Remove this rank's files once every peer has mapped them (mappings stay valid)."""
        for name in self._names():
            with contextlib.suppress(FileNotFoundError):
                self.path(self.rank, name).unlink()

    def peer(self, reader: int, slot: str, nbytes: int) -> torch.Tensor:
        """A view of ``reader``'s slot (mapped by :meth:`attach`)."""
        return self._peers[(reader, slot)][:nbytes]

    # -- the protocol ---------------------------------------------------------------------

    @staticmethod
    def _index(slot: str) -> int:
        return int(slot[3:])

    def acquire(self, number: int, stop: threading.Event) -> bool:
        """Reader thread: wait until every rank is done with what bucket ``number``'s slot
        held before. False when ``stop`` was set meanwhile; PeerError when a rank died,
        aborted or did not finish within the timeout."""
        before = self.previous.get(number)
        if before is None:
            return True
        s = self._index(self.slot_of[number])
        ctl = self._ctl[self.rank]
        base = _HEAD + SLOTS + s * self.world

        def lagging() -> list[int]:
            return [r for r in range(self.world) if ctl[base + r] < before + 1]

        return self._wait(
            lambda: not lagging(),
            lagging,
            f"shared memory: waiting for every rank to finish bucket {before} "
            f"before reading bucket {number}",
            stop,
            _WAIT_READER,
        )

    def publish(self, number: int, ok: bool) -> None:
        """Reader thread: bucket ``number`` is in its slot (or its read failed)."""
        _fence()
        s = self._index(self.slot_of[number])
        self._ctl[self.rank][_HEAD + s] = number + 1 if ok else -(number + 1)

    def await_bucket(self, number: int, reader: int) -> bool:
        """Main thread: wait until ``reader`` has published bucket ``number``. True when its
        bytes are there, False when the reader failed to read it (it shares why at the next
        status check). PeerError when the reader died, aborted or stayed silent past the
        timeout."""
        s = self._index(self.slot_of[number])
        ctl = self._ctl[reader]
        want = number + 1

        def published() -> bool:
            return abs(int(ctl[_HEAD + s])) >= want

        self._wait(
            published,
            lambda: [] if published() else [reader],
            f"shared memory: waiting for rank {reader} to read bucket {number}",
            None,
            _WAIT_MAIN,
        )
        got = int(ctl[_HEAD + s])
        if abs(got) != want:  # pragma: no cover - would be a bug in the slot discipline
            raise RuntimeError(f"slot of bucket {number} holds bucket {abs(got) - 1}")
        return got > 0

    def mark_done(self, number: int, reader: int) -> None:
        """Main thread: this rank is done with bucket ``number`` of ``reader``'s slot."""
        s = self._index(self.slot_of[number])
        _fence()
        self._ctl[reader][_HEAD + SLOTS + s * self.world + self.rank] = number + 1

    def abort(self, blame: Sequence[int] = ()) -> None:
        """This rank leaves the load with an error that names ``blame`` (this rank when
        empty): peers waiting on it stop waiting and name the same ranks."""
        ctl = self._ctl.get(self.rank)
        if ctl is None:
            return
        ranks = [r for r in blame if 0 <= r < self.world] or [self.rank]
        ctl[_ABORT] = _mask(ranks) if self.world < 63 else -1

    def _gone(self, ranks: Sequence[int]) -> tuple[list[int], list[str]]:
        """Of ``ranks``, those that died or left the load: the ranks to blame (a dead rank
        itself; for one that left, the ranks its error named) and a phrase for each."""
        blamed: set[int] = set()
        said = []
        for r in ranks:
            ctl = self._ctl.get(r)
            if ctl is None:
                continue
            flag = int(ctl[_ABORT])
            if flag > 0:
                named = {b for b in range(self.world) if flag >> b & 1} - {self.rank}
                blamed |= named or {r}
                if named and named != {r}:
                    said.append(f"rank {r} left the load, its error naming ranks {sorted(named)}")
                else:
                    said.append(f"rank {r} failed and left the load")
            elif flag:
                blamed.add(r)
                said.append(f"rank {r} left the load")
            elif r in self._pids and not _alive(self._pids[r]):
                blamed.add(r)
                said.append(f"rank {r} (process {self._pids[r]}) died")
        return sorted(blamed), said

    def _stalled(self, ranks: Sequence[int]) -> list[int]:
        """Follow the chain of waits from ``ranks`` (control words 2 and 3) to the ranks that
        wait on nobody: the ones holding everybody up. ``ranks`` themselves if none is found."""
        seen: set[int] = set()
        frontier, found = list(ranks), []
        while frontier:
            r = frontier.pop()
            if r in seen or r == self.rank or r not in self._ctl:
                continue
            seen.add(r)
            mask = int(self._ctl[r][_WAIT_MAIN]) | int(self._ctl[r][_WAIT_READER])
            if mask:
                frontier.extend(b for b in range(self.world) if mask >> b & 1)
            else:
                found.append(r)
        return sorted(found) or sorted(ranks)

    def _wait(
        self,
        ready: Callable[[], bool],
        waiting_on: Callable[[], list[int]],
        what: str,
        stop: threading.Event | None,
        word: int,
    ) -> bool:
        """Poll ``ready`` until it holds (True) or ``stop`` is set (False); PeerError naming
        the ranks ``waiting_on`` returns when one of them died or aborted, or at the timeout
        the ranks at the end of the chain of waits. While waiting, this thread's control
        ``word`` holds the ranks it waits on; it is cleared only when the wait ends well
        (after a PeerError it keeps naming them until this rank's abort flag does)."""
        if ready():
            _fence()
            return True
        own = self._ctl[self.rank]
        if self.world < 63:
            own[word] = _mask(waiting_on())
        start = time.monotonic()
        probe, pause = start + PROBE_SECONDS, 2e-5
        while not ready():
            if stop is not None and stop.is_set():
                own[word] = 0
                return False
            now = time.monotonic()
            if now >= probe:
                probe = now + PROBE_SECONDS
                ranks = waiting_on()
                if self.world < 63:
                    own[word] = _mask(ranks)
                gone, said = self._gone(ranks)
                if gone:
                    why, detail = "died or left the load", "; ".join(said)
                elif now - start > self.timeout:
                    gone, why = self._stalled(ranks), "stopped answering"
                    detail = f"no answer within {self.timeout:g} s; ranks not answering: {gone}"
                if gone:
                    raise PeerError(
                        f"rank {self.rank}: transfer: {what}: {detail}",
                        phase="transfer",
                        failures=tuple(
                            Failure(r, "transfer", "PeerError", f"rank {r} {why}") for r in gone
                        ),
                    )
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        _fence()
        own[word] = 0
        return True

    @property
    def nbytes(self) -> int:
        """Shared memory this rank holds (its own slots)."""
        return sum(t.numel() for t in self._own.values())

    def close(self, *, purge: bool = False) -> None:
        """Drop every mapping and remove this rank's files; with ``purge`` (after a failed
        load, when a peer may have died without cleaning up) every rank's files of this load."""
        self._peers.clear()
        self._own.clear()
        self._ctl.clear()
        self._maps.clear()
        owners = range(self.world) if purge else (self.rank,)
        for rank in owners:
            for name in self._names():
                with contextlib.suppress(FileNotFoundError):
                    self.path(rank, name).unlink()
