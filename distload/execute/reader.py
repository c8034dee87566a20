"""The read-ahead: a background thread that reads this rank's buckets in plan order.

Runs on every reader rank (a rank with buckets to read), beside the executor's main thread.
Each bucket becomes a :class:`Read` (its bytes, in a staging arena, a shared-memory slot or
straight in the destinations) or a :class:`ReadFailure` (the error, for the main thread to
share with every rank at the next agreement). Pieces are checked against the manifest's chunk
hashes as they arrive when the plan carries digests. The ring of staging arenas bounds the
memory read ahead; pieces read straight into destinations need no arena, so the thread runs
ahead through such buckets and keeps the storage busy while the main thread waits on peers.

Inline (``distload.execute.run.inline_reads``: nothing to transfer, and no core to spare for
a thread) no thread starts: the main thread reads each bucket when it asks for it.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distload.arenas import Arenas
from distload.errors import CheckpointError, DistLoadError
from distload.geometry import Segment, piece_bytes, piece_offset, read_slots
from distload.plan import Bucket, Item, LoadPlan
from distload.shm import ShmExchange
from distload.storage import FileReader, ReadRequest, byte_view

log = logging.getLogger(__name__)

PREFETCH_DEPTH = 3  # staging arenas in the read-ahead ring (buckets needing staging)
# consecutive local buckets read straight into destinations are read together, up to this
DIRECT_BATCH_BYTES = 64 * 1024 * 1024


@dataclass
class Read:
    """A bucket this rank read: where each staged piece lies in ``buffer`` (``slots``), which
    pieces went straight into their destinations (``direct``), and the arena or shared-memory
    slot holding ``buffer`` (None when every piece is direct)."""

    bucket: Bucket
    buffer: torch.Tensor | None = None
    slots: dict[Item, Segment] = field(default_factory=dict)
    direct: set[Item] = field(default_factory=set)
    arena: str | None = None
    # pieces whose bytes lie in another buffer than ``buffer`` (a page-cached bucket: each
    # piece in the mapping of its own file, ``slots`` giving its offset there)
    buffers: dict[Item, torch.Tensor] = field(default_factory=dict)

    def staged(self) -> torch.Tensor:
        """The staging buffer (only asked for when some piece is not direct)."""
        if self.buffer is None:
            raise RuntimeError(f"bucket of {len(self.bucket.items)} pieces has no staging buffer")
        return self.buffer

    def buffer_of(self, item: Item) -> torch.Tensor:
        """The buffer holding piece ``item`` (``slots[item]`` is its place there)."""
        got = self.buffers.get(item)
        return got if got is not None else self.staged()

    @property
    def all_direct(self) -> bool:
        return len(self.direct) == len(self.bucket.items)


@dataclass
class ReadFailure:
    """A bucket this rank could not read: the error, and the arena to give back."""

    bucket: Bucket
    error: BaseException
    arena: str | None = None
    fatal: bool = False  # a peer was found gone: raise at once, there is no one to tell


Outcome = Read | ReadFailure
DirectTargets = Callable[[int, Bucket], dict[Item, memoryview]]


@dataclass
class ReadStats:
    """What the read-ahead did (read by the executor when the phase ends)."""

    seconds: float = 0.0


def staged_end(slots: list[Segment]) -> int:
    """Bytes of a staging buffer holding ``slots`` (their furthest end)."""
    return max((s.offset + s.nbytes for s in slots), default=0)


class ReadAhead:
    """Reads this rank's buckets in plan order on a background thread (bounded ring).

    Call order (main thread): construct (starts the thread when this rank reads anything),
    :meth:`next` once per bucket this rank reads, in plan order, :meth:`release` each outcome
    once its bytes are used, :meth:`stop` at the end (also after a failure).
    """

    def __init__(
        self,
        plan: LoadPlan,
        rank: int,
        *,
        reader: FileReader,
        arenas: Arenas,
        direct_targets: DirectTargets,
        shm: ShmExchange | None = None,
        skip: frozenset[int] = frozenset(),
        cuda: torch.device | None = None,
        inline: bool = False,
    ) -> None:
        self.plan, self.rank, self.reader, self.arenas = plan, rank, reader, arenas
        # inline: no thread; the main thread reads each bucket when it asks for it (where a
        # thread would only take turns with the main one for the same cores)
        self.inline = inline
        self._position = 0
        # copies out of a pinned arena into CUDA memory are asynchronous: an arena is read into
        # again only after the copies queued before its release have run (one event each)
        self.cuda = cuda
        self.fences: dict[str, torch.cuda.Event] = {}
        self.direct_targets = direct_targets
        self.stats = ReadStats()
        self.shm = shm
        # ``skip``: buckets every rank reads from the page cache itself (nothing to read here)
        self.mine = [
            (n, b) for n, b in enumerate(plan.buckets) if b.reader == rank and n not in skip
        ]
        self.digests = {t: (rows, chunks) for t, rows, chunks in plan.digests}
        # files the plan found in the page cache: announcing their ranges would only make the
        # kernel walk pages it already holds (3 % of a warm load's CPU samples, TP over 4 ranks)
        self.resident = frozenset(plan.cached_files)
        self.free: queue.Queue[str] = queue.Queue()
        for i in range(PREFETCH_DEPTH):
            self.free.put(f"read{i}")
        self.ready: queue.Queue[Outcome] = queue.Queue()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="distload-prefetch", daemon=True)
        if self.mine and not inline:
            self.thread.start()

    # -- the reader thread --------------------------------------------------------------------

    def _run(self) -> None:
        position = 0
        while position < len(self.mine):
            advanced = self._advance(position)
            if advanced is None:
                return
            position = advanced

    def _advance(self, position: int) -> int | None:
        """Read the bucket at ``position`` of :attr:`mine` (with the direct buckets after it
        that join its pass) and queue the outcomes; the next position, or None when the
        reading must end (stopped)."""
        number, bucket = self.mine[position]
        try:
            targets = self.direct_targets(number, bucket) if bucket.kind == "local" else {}
        except Exception as exc:  # delivered to the main thread, which decides
            self.ready.put(ReadFailure(bucket, exc))
            return position + 1
        batch = [(bucket, targets)] if len(targets) == len(bucket.items) else []
        if batch:
            batch += self._direct_run(position + 1, sum(len(t) for t in targets.values()))
        after = position + max(1, len(batch))
        if after < len(self.mine):  # storage starts on the next bucket meanwhile
            try:
                self._advise(self.mine[after][1])
            except Exception:  # a hint only: never let it end the reader thread
                log.debug("read-ahead hint failed", exc_info=True)
        if batch:
            if self._stop.is_set():
                return None
            for outcome in self._read_direct(batch):
                self.ready.put(outcome)
        elif not self._one(number, bucket, targets):
            return None
        return after

    def _direct_run(self, position: int, size: int) -> list[tuple[Bucket, dict[Item, memoryview]]]:
        """The local buckets from ``position`` on whose pieces all go straight into their
        destinations, while they total at most :data:`DIRECT_BATCH_BYTES` with ``size``
        bytes already taken: read together, they keep more requests in flight and cost one
        hand-over to the read pool instead of one each."""
        batch: list[tuple[Bucket, dict[Item, memoryview]]] = []
        while position < len(self.mine):
            number, bucket = self.mine[position]
            if bucket.kind != "local":
                break
            try:
                targets = self.direct_targets(number, bucket)
            except Exception:  # read on its own: its failure is reported for it alone
                break
            nbytes = sum(len(t) for t in targets.values())
            if len(targets) != len(bucket.items) or size + nbytes > DIRECT_BATCH_BYTES:
                break
            batch.append((bucket, targets))
            size += nbytes
            position += 1
        return batch

    def _read_direct(self, batch: list[tuple[Bucket, dict[Item, memoryview]]]) -> list[Outcome]:
        """Read consecutive buckets straight into their destinations in one pass; a failure
        is every one of them's (the error names the tensor)."""
        start = time.perf_counter()
        try:
            self._fill(batch)
        except BaseException as exc:  # delivered to the main thread, which decides
            self.stats.seconds += time.perf_counter() - start
            return [ReadFailure(bucket, exc) for bucket, _ in batch]
        self.stats.seconds += time.perf_counter() - start
        return [Read(bucket, direct=set(targets)) for bucket, targets in batch]

    def _one(self, number: int, bucket: Bucket, targets: dict[Item, memoryview]) -> bool:
        """Read one bucket that needs staging (``targets``: its pieces that go straight into
        their destinations) and queue its outcome; False when the thread must end."""
        slot = self.shm.slot_of.get(number) if self.shm is not None else None
        if self.shm is not None and slot is not None:
            try:  # this bucket's shared-memory slot, once every rank is done with it
                if not self.shm.acquire(number, self._stop):
                    return False
            except DistLoadError as exc:  # a peer is gone: the main thread raises it
                self.ready.put(ReadFailure(bucket, exc, fatal=True))
                return False
            outcome = self._read(bucket, slot, targets)
            self.shm.publish(number, ok=isinstance(outcome, Read))
            self.ready.put(outcome)
            return True
        arena = self._free_arena()
        if arena is None:
            return False
        self.ready.put(self._read(bucket, arena, targets))
        return True

    def _free_arena(self) -> str | None:
        """The next free staging arena (waiting for one), or None once stopped."""
        while not self._stop.is_set():
            try:
                arena = self.free.get(timeout=0.1)
            except queue.Empty:
                continue
            fence = self.fences.pop(arena, None)
            if fence is not None:
                fence.synchronize()
            return arena
        return None

    def _advise(self, bucket: Bucket) -> None:
        """Tell the kernel which byte ranges this reader asks for next (read-ahead hint), one
        call per run of pieces stored back to back; none for files already in the page
        cache."""
        run: tuple[str, int, int] | None = None  # (file, start, end)
        for item in bucket.items:
            meta = self.plan.tensors[item.tensor]
            if meta.file in self.resident:
                continue
            start = piece_offset(meta, item)
            end = start + piece_bytes(meta, item)
            if run is not None and run[0] == meta.file and run[2] == start:
                run = (run[0], run[1], end)
                continue
            if run is not None:
                self.reader.advise(run[0], run[1], run[2] - run[1])
            run = (meta.file, start, end)
        if run is not None:
            self.reader.advise(run[0], run[1], run[2] - run[1])

    def _read(self, bucket: Bucket, arena: str | None, direct: dict[Item, memoryview]) -> Outcome:
        """Read ``bucket``: pieces in ``direct`` straight into their destination memory, the
        rest into ``arena`` (None when every piece is direct)."""
        out = Read(bucket, arena=arena, direct=set(direct))
        start = time.perf_counter()
        try:
            targets = dict(direct)
            if arena is not None:  # the staging layout (a shm slot's is the same on all ranks)
                slots, total = read_slots(self.plan, bucket)
                staged = [s for s in slots if s.item not in direct]
                # the whole layout when every piece is staged: a broadcast sends this buffer
                # as it is, and every rank must pass a buffer of one size (NCCL counts)
                size = total if len(staged) == len(slots) else staged_end(staged)
                if self.shm is not None and arena.startswith("shm"):
                    out.buffer = self.shm.own(arena, size)
                else:
                    out.buffer = self.arenas.get(arena, size)
                host = byte_view(out.buffer)
                for slot in staged:
                    out.slots[slot.item] = slot
                    targets[slot.item] = host[slot.offset : slot.offset + slot.nbytes]
            self._fill([(bucket, targets)])
        except BaseException as exc:  # delivered to the main thread, which decides
            self.stats.seconds += time.perf_counter() - start
            return ReadFailure(bucket, exc, arena=arena)
        self.stats.seconds += time.perf_counter() - start
        return out

    def _fill(self, buckets: list[tuple[Bucket, dict[Item, memoryview]]]) -> None:
        """Read every piece of ``buckets`` into its target (one pass over the read pool: in
        file order, back-to-back pieces join into one preadv), checking it against the
        manifest when verifying."""
        tensors = self.plan.tensors
        requests = []
        for bucket, targets in buckets:
            for item in bucket.items:
                meta = tensors[item.tensor]
                target = targets[item]
                if len(target):
                    requests.append(
                        ReadRequest(meta.file, piece_offset(meta, item), target, meta.name)
                    )
        self.reader.read(requests)
        if self.digests:
            for bucket, targets in buckets:
                for item in bucket.items:
                    self._check(item, targets[item])

    def _check(self, item: Item, data: memoryview) -> None:
        """Compare a piece just read with its manifest chunk hash (when verifying)."""
        digest = self.digests.get(item.tensor)
        if digest is None:
            return
        rows, chunks = digest
        got = hashlib.sha256(data).hexdigest()
        want = chunks[item.start // rows]
        if got != want:
            meta = self.plan.tensors[item.tensor]
            start = piece_offset(meta, item)
            raise CheckpointError(
                f"{meta.file}: bytes [{start}, {start + len(data)}) of tensor {meta.name!r} "
                f"(rows {item.start}..{item.stop}, manifest chunk {item.start // rows}) do not "
                f"match the manifest: sha256 {got[:16]}... != {want[:16]}... (file changed "
                "or corrupted)",
                file=meta.file,
                tensor=meta.name,
            )

    # -- the main thread ----------------------------------------------------------------------

    def next(self, bucket: Bucket) -> Outcome:
        """This rank's read of ``bucket`` (the next one it reads, in plan order)."""
        if self.inline:
            while self.ready.empty() and self._position < len(self.mine):
                advanced = self._advance(self._position)
                self._position = len(self.mine) if advanced is None else advanced
            if self.ready.empty():  # pragma: no cover - would be a bug in ordering
                raise RuntimeError("no read left for a bucket this rank reads")
        while True:
            try:
                got = self.ready.get(timeout=0.5)
                break
            except queue.Empty:
                # a reader thread that died outside a read must not leave this rank waiting
                if not self.thread.is_alive() and self.ready.empty():
                    raise DistLoadError(
                        "the reader thread ended before reading every bucket", phase="read"
                    ) from None
        if got.bucket is not bucket:  # pragma: no cover - would be a bug in ordering
            raise RuntimeError("prefetch order diverged from the plan order")
        return got

    def release(self, outcome: Outcome) -> None:
        """Give a staging arena back to the ring (shared-memory slots go back to the reader
        once every rank has marked their bucket done, see ``distload.shm``)."""
        arena = outcome.arena
        if arena is not None and not arena.startswith("shm"):
            if self.cuda is not None:
                fence = torch.cuda.Event()
                fence.record(torch.cuda.current_stream(self.cuda))
                self.fences[arena] = fence
            self.free.put(arena)

    def stop(self) -> None:
        """End the thread: give back what it queued (an arena it waits for may be among
        them) and wait for its read -- returning as soon as it ends: after its last bucket
        it ends at once, and no wait on the queue may hold this rank up meanwhile."""
        self._stop.set()
        while self.thread.is_alive():
            try:
                self.release(self.ready.get_nowait())
            except queue.Empty:
                self.thread.join(timeout=0.005)


__all__ = ["PREFETCH_DEPTH", "DirectTargets", "Outcome", "Read", "ReadAhead", "ReadFailure"]
