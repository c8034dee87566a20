"""Execute a plan on one rank: read, transfer and copy every bucket into the destinations.

Runs on every rank of the group, each with the same plan. Buckets are processed in the plan's
single global order:

* a ``local`` bucket concerns its reader only (no communication); pieces that land unchanged
  in a contiguous region of the destination are read straight into it;
* ``broadcast`` buckets move one packed buffer from the reader to all ranks; ``p2p`` buckets
  send each class of receivers only its own parts (packed once per class): point to point to
  a single rank, a multicast (reader -> root -> broadcast inside the class) to several;
* a ``p2p`` bucket involves only its *participants* (reader and receivers); other ranks go
  straight on to their next bucket, so buckets with disjoint participants (pipeline stages,
  data-parallel replicas reading their own stage) move at the same time. Every rank still
  takes its buckets in the global order, so the lowest unfinished bucket always has all its
  participants at it: no deadlock;
* all ranks agree on a status flag (one small ``all_reduce``) before every
  ``plan.check_every``-th shared bucket (and, over the transport, before every broadcast
  bucket), so a failure ends the load everywhere within a bounded number of buckets instead of
  leaving peers waiting. A rank that fails between two checks keeps to the schedule (its sends
  go out unfilled, its receives are dropped) until the next check, where every rank raises the
  same error;
* when all ranks share one node (host memory), shared buckets skip the transport: the reader
  thread reads into a shared-memory slot and publishes it, and each rank copies its parts from
  it as soon as it is there (``distload.shm``): no collective per bucket, readers run ahead.

A background thread reads this rank's upcoming buckets (in plan order) into a ring of staging
arenas while the main thread transfers the current one, overlapping storage and network.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distload.coordination import agree
from distload.dtypes import to_torch
from distload.errors import CheckpointError, DistLoadError, failure_from_exception
from distload.geometry import (
    Part,
    Segment,
    aligned,
    piece_bytes,
    piece_offset,
    piece_shape,
    read_slots,
    segments_for,
)
from distload.plan import Bucket, Item, LoadPlan
from distload.shm import ShmExchange
from distload.storage import Arenas, FileReader, ReadRequest, byte_view
from distload.transport.base import Transport

log = logging.getLogger(__name__)

PREFETCH_DEPTH = 3  # staging arenas in the read-ahead ring (buckets needing staging)


@dataclass
class ExecStats:
    """What this rank did while executing (part of the load report)."""

    bytes_read: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    read_seconds: float = 0.0
    transfer_seconds: float = 0.0
    buckets: int = 0
    direct_reads: int = 0


def _what(number: int, bucket: Bucket) -> str:
    """How a bucket's transfer is named in errors."""
    return f"transfer: bucket {number} ({bucket.kind}, reader rank {bucket.reader})"


def _region(tensor: torch.Tensor, box: tuple[tuple[int, int], ...]) -> torch.Tensor:
    return tensor[tuple(slice(a, b) for a, b in box)] if box else tensor


def _view(buf: torch.Tensor, seg: Segment) -> torch.Tensor:
    """The segment's bytes in ``buf`` as a tensor of its dtype and shape."""
    raw = buf[seg.offset : seg.offset + seg.nbytes]
    return raw.view(to_torch(seg.dtype)).view(seg.part.shape)


def _source(ready: _Ready, seg: Segment) -> torch.Tensor:
    """The region of a read piece that ``seg`` describes, in output orientation."""
    assert ready.buffer is not None
    piece = _view(ready.buffer, ready.slots[seg.item])
    region = _region(piece, seg.part.src)
    return region.t() if seg.part.transposed else region


# parts up to this size that fill a whole host destination are copied as plain memory: no
# tensor views (the per-piece cost that dominates a checkpoint of tens of thousands of small
# tensors). Larger ones go through torch, whose copies release the GIL that the reader
# thread needs to keep its reads going.
SMALL_COPY_BYTES = 256 * 1024


def _fills(part: Part, dest: torch.Tensor, dtype: str, nbytes: int) -> bool:
    """Whether ``part`` (``nbytes`` of ``dtype``) is small and all of ``dest``, a contiguous
    host tensor of that dtype (so a plain memory copy fills it)."""
    return (
        nbytes <= SMALL_COPY_BYTES
        and not part.transposed
        and dest.device.type == "cpu"
        and part.shape == dest.shape
        and dest.dtype == to_torch(dtype)
        and dest.is_contiguous()
    )


# (piece, offset in its bucket's read layout, bytes, destination rows): see _whole_layout
_Pieces = list[tuple[Item, int, int, torch.Tensor]]


@dataclass
class _Ready:
    """A bucket read by this rank: its slots and the arena holding them (or the error)."""

    bucket: Bucket
    buffer: torch.Tensor | None = None
    slots: dict[Item, Segment] = field(default_factory=dict)
    direct: set[Item] = field(default_factory=set)
    arena: str | None = None
    error: BaseException | None = None
    fatal: bool = False  # the error is a peer found gone: raise it, there is no one to tell


class _Prefetcher:
    """Reads this rank's buckets in plan order on a background thread (bounded ring)."""

    def __init__(
        self,
        plan: LoadPlan,
        rank: int,
        *,
        reader: FileReader,
        arenas: Arenas,
        direct_targets: Callable[[Bucket], dict[Item, memoryview]],
        stats: ExecStats,
        shm: ShmExchange | None = None,
        cuda: torch.device | None = None,
    ) -> None:
        self.plan, self.rank, self.reader, self.arenas = plan, rank, reader, arenas
        # copies out of a pinned arena into CUDA memory are asynchronous: an arena is read into
        # again only after the copies queued before its release have run (one event each)
        self.cuda = cuda
        self.fences: dict[str, torch.cuda.Event] = {}
        self.direct_targets = direct_targets
        self.stats = stats
        self.shm = shm
        self.mine = [(n, b) for n, b in enumerate(plan.buckets) if b.reader == rank]
        self.digests = {t: (rows, chunks) for t, rows, chunks in plan.digests}
        self.free: queue.Queue[str] = queue.Queue()
        for i in range(PREFETCH_DEPTH):
            self.free.put(f"read{i}")
        self.ready: queue.Queue[_Ready] = queue.Queue()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="distload-prefetch", daemon=True)
        if self.mine:
            self.thread.start()

    def _run(self) -> None:
        for position, (number, bucket) in enumerate(self.mine):
            if position + 1 < len(self.mine):  # storage starts on the next bucket meanwhile
                try:
                    self._advise(self.mine[position + 1][1])
                except Exception:  # a hint only: never let it end the reader thread
                    log.debug("read-ahead hint failed", exc_info=True)
            try:
                targets = self.direct_targets(bucket) if bucket.kind == "local" else {}
            except Exception as exc:  # delivered to the main thread, which decides
                self.ready.put(_Ready(bucket, error=exc))
                continue
            if len(targets) == len(bucket.items):
                # read straight into the destinations: no staging, so no need to wait for a
                # free arena; the reader runs ahead through such buckets and keeps the
                # storage busy while the main thread waits on peers' shared buckets
                if self._stop.is_set():
                    return
                self.ready.put(self._read(bucket, None, targets))
                continue
            arena = None
            slot = self.shm.slot_of.get(number) if self.shm is not None else None
            if slot is not None:  # this bucket's shared-memory slot, once every rank is done
                assert self.shm is not None
                try:
                    if not self.shm.acquire(number, self._stop):
                        return
                except DistLoadError as exc:  # a peer is gone: the main thread raises it
                    self.ready.put(_Ready(bucket, error=exc, fatal=True))
                    return
                ready = self._read(bucket, slot, targets)
                self.shm.publish(number, ok=ready.error is None)
                self.ready.put(ready)
                continue
            while arena is None:
                if self._stop.is_set():
                    return
                try:
                    arena = self.free.get(timeout=0.1)
                except queue.Empty:
                    continue
                fence = self.fences.pop(arena, None)
                if fence is not None:
                    fence.synchronize()
            self.ready.put(self._read(bucket, arena, targets))

    def _advise(self, bucket: Bucket) -> None:
        """Tell the kernel which byte ranges this reader asks for next (read-ahead hint), one
        call per run of pieces stored back to back."""
        run: tuple[str, int, int] | None = None  # (file, start, end)
        for item in bucket.items:
            meta = self.plan.tensors[item.tensor]
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

    def _read(self, bucket: Bucket, arena: str | None, direct: dict[Item, memoryview]) -> _Ready:
        """Read ``bucket``: pieces in ``direct`` straight into their destination memory, the
        rest into ``arena`` (None when every piece is direct)."""
        out = _Ready(bucket, arena=arena)
        start = time.perf_counter()
        try:
            targets = dict(direct)
            if arena is not None:  # the staging layout (a shm slot's is the same on all ranks)
                slots, _ = read_slots(self.plan, bucket)
                staged = [s for s in slots if s.item not in direct]
                size = max((s.offset + s.nbytes for s in staged), default=0)
                if arena.startswith("shm"):
                    assert self.shm is not None
                    out.buffer = self.shm.own(arena, size)
                else:
                    out.buffer = self.arenas.get(arena, size)
                host = byte_view(out.buffer)
                for slot in staged:
                    out.slots[slot.item] = slot
                    targets[slot.item] = host[slot.offset : slot.offset + slot.nbytes]
            out.direct = set(direct)
            requests = []
            tensors = self.plan.tensors
            for item in bucket.items:  # file order: back-to-back pieces join into one preadv
                meta = tensors[item.tensor]
                target = targets[item]
                if len(target):
                    offset = piece_offset(meta, item)
                    requests.append(ReadRequest(meta.file, offset, target, meta.name))
            self.reader.read(requests)
            if self.digests:
                for item in bucket.items:
                    self._check(item, targets[item])
        except BaseException as exc:  # delivered to the main thread, which decides
            out.error = exc
        self.stats.read_seconds += time.perf_counter() - start
        return out

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

    def next(self, bucket: Bucket) -> _Ready:
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

    def release(self, ready: _Ready) -> None:
        """Give a staging arena back to the ring (shared-memory slots go back to the reader
        once every rank has marked their bucket done, see ``distload.shm``)."""
        if ready.arena is not None and not ready.arena.startswith("shm"):
            if self.cuda is not None:
                fence = torch.cuda.Event()
                fence.record(torch.cuda.current_stream(self.cuda))
                self.fences[ready.arena] = fence
            self.free.put(ready.arena)

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            # drain so the worker is never blocked, then wait for the read in flight
            while self.thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self.release(self.ready.get(timeout=0.05))
            self.thread.join()


class Executor:
    """Runs one plan on one rank. Every rank of the group must call :meth:`run` together."""

    def __init__(
        self,
        plan: LoadPlan,
        transport: Transport,
        dests: dict[int, torch.Tensor],
        reader: FileReader,
        *,
        host_arenas: Arenas,
        comm_arenas: Arenas,
        on_bucket: Callable[[int], None] | None = None,
        shm: ShmExchange | None = None,
        multicast: bool = False,
    ) -> None:
        self.plan = plan
        self.transport = transport
        self.rank = transport.rank
        self.dests = dests
        self.reader = reader
        self.host_arenas = host_arenas
        self.comm_arenas = comm_arenas
        self.on_bucket = on_bucket
        self.stats = ExecStats()
        self.pending: BaseException | None = None  # a local failure not yet shared
        self._agreed = False  # whether the current bucket's status check has passed
        self._moving = False  # whether the current bucket's sends/receives have started
        self.shm = shm  # same-node shared-memory exchange (None: transfers go over transport)
        self._shm_started = False  # whether a shared bucket went through shared memory yet
        # whether the transport opened the plan's multicast groups (else classes of several
        # receivers are sent to member by member)
        self.multicast = multicast
        # (id of a bucket of ``plan.buckets``, rank) -> segments_for(...): the plan keeps every
        # bucket alive for the whole run, so ids are stable
        self._segment_cache: dict[tuple[int, int], tuple[list[Segment], int]] = {}
        self.checks = plan.status_checks(shm=shm is not None)  # buckets a status check precedes

    # -- destinations -------------------------------------------------------------------------

    def _segments(self, bucket: Bucket, rank: int) -> tuple[list[Segment], int]:
        """``segments_for`` of a bucket of this plan, computed once per (bucket, rank) for this
        run (the reader thread and the main thread both ask; a bucket of thousands of small
        tensors is then walked once, not three times)."""
        key = (id(bucket), rank)
        got = self._segment_cache.get(key)
        if got is None:
            got = segments_for(self.plan, bucket, rank)
            self._segment_cache[key] = got
        return got

    def _direct_targets(self, bucket: Bucket) -> dict[Item, memoryview]:
        """Destination memory each piece of a local bucket can be read into unchanged (pieces
        whose bytes are one contiguous region of a destination of the stored dtype).

        Runs on the reader thread, once per piece: a checkpoint of tens of thousands of tiny
        tensors spends its time here, so the common case (the piece is the whole destination)
        takes no tensor slicing, and a bucket of only such pieces no segment layout."""
        whole = self._whole_layout(bucket, everyone=False)
        if whole is not None:
            return {item: byte_view(rows) for item, _, _, rows in whole[0]}
        segs = self._segments(bucket, self.rank)[0]
        targets: dict[Item, memoryview] = {}
        tensors = self.plan.tensors
        for i, seg in enumerate(segs):
            item, part = seg.item, seg.part
            # a piece's segments are consecutive: take pieces of exactly one segment
            if (i > 0 and segs[i - 1].item == item) or (
                i + 1 < len(segs) and segs[i + 1].item == item
            ):
                continue
            meta = tensors[item.tensor]
            if part.transposed or part.shape != piece_shape(meta, item):
                continue
            dest = self.dests.get(part.output)
            if dest is None or dest.device.type != "cpu" or dest.dtype != to_torch(meta.dtype):
                continue
            if part.shape == dest.shape and dest.is_contiguous():
                targets[item] = byte_view(dest)  # the piece is the whole destination
                continue
            region = _region(dest, part.dst)
            if region.is_contiguous():
                targets[item] = byte_view(region)
        return targets

    def _deliver(self, segs: list[Segment], buf: torch.Tensor) -> None:
        """Copy packed segments of ``buf`` into this rank's destinations."""
        host = byte_view(buf) if buf.device.type == "cpu" else None
        for seg in segs:
            dest = self.dests.get(seg.part.output)
            if dest is None:
                continue
            if host is not None and _fills(seg.part, dest, seg.dtype, seg.nbytes):
                byte_view(dest)[:] = host[seg.offset : seg.offset + seg.nbytes]
                continue
            _region(dest, seg.part.dst).copy_(_view(buf, seg), non_blocking=True)

    def _own_parts(self, ready: _Ready) -> None:
        """Copy the parts this reader holds itself straight from its read slots."""
        if len(ready.direct) == len(ready.bucket.items):
            return  # every piece was read straight into its destination
        assert ready.buffer is not None
        host = byte_view(ready.buffer) if ready.buffer.device.type == "cpu" else None
        for seg in self._segments(ready.bucket, self.rank)[0]:
            if seg.item in ready.direct:
                continue
            dest = self.dests.get(seg.part.output)
            if dest is None:
                continue
            slot = ready.slots[seg.item]
            if (
                host is not None
                and seg.part.shape == slot.part.shape  # the whole piece
                and _fills(seg.part, dest, slot.dtype, slot.nbytes)
            ):
                byte_view(dest)[:] = host[slot.offset : slot.offset + slot.nbytes]
                continue
            _region(dest, seg.part.dst).copy_(_source(ready, seg), non_blocking=True)

    def _pack(self, ready: _Ready, segs: list[Segment], size: int) -> torch.Tensor:
        """Pack parts of the read pieces into the send layout ``segs`` (casting if needed).

        Once this rank has failed (``pending``) the buffer goes out unfilled: the load ends at
        the next status check and the bytes are never used."""
        buf = self.comm_arenas.get("pack", size)
        if self.pending is None:
            try:
                assert ready.buffer is not None
                for seg in segs:
                    _view(buf, seg).copy_(_source(ready, seg), non_blocking=True)
            except Exception as exc:
                self._fail_pending(exc, "transfer")
        return buf

    def _cuda_device(self) -> torch.device | None:
        """The CUDA device this rank's destinations live on (copies from pinned arenas into it
        are asynchronous), or None."""
        if self.comm_arenas.device.type == "cuda":
            return self.comm_arenas.device
        return next((d.device for d in self.dests.values() if d.device.type == "cuda"), None)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> ExecStats:
        prefetch = _Prefetcher(
            self.plan,
            self.rank,
            reader=self.reader,
            arenas=self.host_arenas,
            direct_targets=self._direct_targets,
            stats=self.stats,
            shm=self.shm,
            cuda=self._cuda_device(),
        )
        try:
            for number, bucket in enumerate(self.plan.buckets):
                self._agreed = self._moving = False
                ready = prefetch.next(bucket) if bucket.reader == self.rank else None
                try:
                    self._step(number, bucket, ready)
                except DistLoadError:
                    raise
                except Exception as exc:
                    if self._agreed or self._moving:  # peers are inside this bucket's transfer
                        raise DistLoadError(
                            f"rank {self.rank}: transfer of bucket {number} failed: "
                            f"{type(exc).__name__}: {exc}",
                            phase="transfer",
                            failures=(failure_from_exception(exc, self.rank, "transfer"),),
                        ) from exc
                    if number in self.checks:
                        # peers are at (or heading for) this bucket's status check: share it
                        agree(self.transport, "transfer", exc)
                        raise
                    # no check before this bucket: keep to the schedule, share at the next one
                    self._fail_pending(exc, "transfer")
                    self._keep_schedule(number, bucket, ready)
                finally:
                    if ready is not None:  # this rank's read of the bucket is done with
                        prefetch.release(ready)
                if self.on_bucket is not None:
                    self.on_bucket(number)
        finally:
            prefetch.stop()
        self.stats.bytes_read = self.reader.bytes_read
        if self.comm_arenas.device.type == "cuda":
            torch.cuda.synchronize(self.comm_arenas.device)
        return self.stats

    def _step(self, number: int, bucket: Bucket, ready: _Ready | None) -> None:
        """Take part in one bucket (``ready``: this rank's read of it, when it is the reader).
        The caller releases ``ready`` afterwards (see :meth:`run`)."""
        if ready is not None and ready.fatal and ready.error is not None:
            raise ready.error  # the reader thread found a peer gone: nothing to share it with
        if ready is not None and ready.error is not None and self.pending is None:
            if getattr(ready.error, "phase", None) is None:
                ready.error.phase = "read"  # type: ignore[attr-defined]
            self.pending = ready.error
        if bucket.kind == "local":
            if ready is not None and self.pending is None:
                self._guard(lambda: self._own_parts(ready))
            return
        if number in self.checks:
            # a peer lost here may have been lost in an earlier transfer (shared memory has
            # no collective of its own) or in its reads
            agree(self.transport, "transfer" if self._shm_started else "read", self.pending)
            self._agreed = True
        if self.shm is None and self.rank not in bucket.participants(self.transport.world_size):
            return  # a p2p bucket between other ranks: they move it meanwhile
        self._shm_started = self.shm is not None
        start = time.perf_counter()
        if self.shm is not None:
            # no collective inside a shared-memory bucket: a failure here is shared with all
            # ranks at the next status check (or the closing agreement); a peer found gone
            # (PeerError) ends the load at once
            try:
                self._shm_bucket(number, bucket, ready)
            except DistLoadError:
                raise
            except Exception as exc:
                self._fail_pending(exc, "transfer")
            finally:  # copies or not, this rank is done with the bucket's slot
                self.shm.mark_done(number, bucket.reader)
            self.stats.transfer_seconds += time.perf_counter() - start
            self.stats.buckets += 1
            return
        what = _what(number, bucket)
        self._moving = True
        if bucket.kind == "broadcast":
            self._broadcast(bucket, ready, what)
        else:
            self._p2p(bucket, ready, what)
        self.stats.transfer_seconds += time.perf_counter() - start
        self.stats.buckets += 1

    def _keep_schedule(self, number: int, bucket: Bucket, ready: _Ready | None) -> None:
        """After a local failure in a bucket no status check precedes: take part in its
        transfers anyway (sends unfilled, receives dropped, since ``pending`` is set), so no
        peer waits on this rank before the next check shares the failure."""
        if bucket.kind == "p2p" and self.rank in bucket.participants(self.transport.world_size):
            self._moving = True
            self._p2p(bucket, ready, _what(number, bucket))

    def _guard(self, fn: Callable[[], None]) -> None:
        """Run a local copy; a failure is kept for the next agreement. Once this rank has
        failed its copies are moot (the load ends at the next check) and are skipped."""
        if self.pending is not None:
            return
        try:
            fn()
        except Exception as exc:  # shared with all ranks at the next agreement
            self.pending = self.pending or exc

    def _fail_pending(self, exc: Exception, phase: str) -> None:
        """Keep ``exc`` (tagged with ``phase`` unless it has one) for the next agreement."""
        if getattr(exc, "phase", None) is None:
            with contextlib.suppress(AttributeError):
                exc.phase = phase  # type: ignore[attr-defined]
        self.pending = self.pending or exc

    def _whole_layout(self, bucket: Bucket, *, everyone: bool) -> tuple[_Pieces, int] | None:
        """For a bucket whose pieces are all rows of stored tensors loaded whole and unchanged
        (:meth:`LoadPlan.whole_output`) into contiguous host destinations of the stored dtype
        -- by every rank (``everyone``: no holders list) or at least by this one -- each
        piece's place in the read layout, its bytes and its destination rows, and the
        layout's size (what every rank receives): reading and copying then need no segment
        layout. None for any other bucket."""
        plan, dests, rank = self.plan, self.dests, self.rank
        tensors, layouts, dtypes = plan.tensors, plan.layouts, plan.dtypes
        pieces: _Pieces = []
        cursor = 0
        for item in bucket.items:
            out = plan.whole_output(item.tensor)
            if out is None:
                return None
            holders = layouts[out].holders
            if holders is not None and (everyone or rank not in holders):
                return None
            meta = tensors[item.tensor]
            dest = dests.get(out)
            if (
                dest is None
                or dtypes[out] != meta.dtype
                or dest.device.type != "cpu"
                or dest.dtype != to_torch(meta.dtype)
                or dest.shape != meta.shape
                or not dest.is_contiguous()
            ):
                return None
            nbytes = piece_bytes(meta, item)
            if meta.shape and (item.start or item.stop != meta.shape[0]):
                dest = dest[item.start : item.stop]
            pieces.append((item, cursor, nbytes, dest))
            cursor = aligned(cursor + nbytes)
        return pieces, cursor

    def _copy_whole(self, pieces: _Pieces, buf: torch.Tensor | None) -> None:
        """Copy each piece of a :meth:`_whole_layout` out of ``buf`` (plain memory copies)."""
        assert buf is not None
        host = byte_view(buf)
        for _, offset, nbytes, dest in pieces:
            byte_view(dest)[:] = host[offset : offset + nbytes]

    def _shm_bucket(self, number: int, bucket: Bucket, ready: _Ready | None) -> None:
        """Same-node exchange: every rank copies its parts from the reader's shm slot."""
        assert self.shm is not None
        whole = self._whole_layout(bucket, everyone=True) if bucket.kind == "broadcast" else None
        if ready is not None:
            if whole is not None:
                self._guard(lambda: self._copy_whole(whole[0], ready.buffer))
                self.stats.bytes_sent += whole[1] * (self.transport.world_size - 1)
                return
            self._guard(lambda: self._own_parts(ready))
            if bucket.kind == "broadcast":
                size = self._segments(bucket, self.rank)[1]
                self.stats.bytes_sent += size * (self.transport.world_size - 1)
            for members in bucket.classes:
                size = self._segments(bucket, members[0])[1]
                self.stats.bytes_sent += size * sum(1 for r in members if r != self.rank)
            return
        if whole is not None:
            size = whole[1]
        else:
            segs, size = self._segments(bucket, self.rank)
            if not segs:
                return  # nothing to copy
        if self.pending is not None:
            return  # this rank failed: its copies are moot
        if not self.shm.await_bucket(number, bucket.reader):
            return  # the reader failed to read it: it shares why at the next status check
        if whole is not None:
            view = self.shm.peer(bucket.reader, self.shm.slot_of[number], whole[1])
            self._guard(lambda: self._copy_whole(whole[0], view))
        else:
            slots, total = read_slots(self.plan, bucket)
            view = self.shm.peer(bucket.reader, self.shm.slot_of[number], total)
            peer = _Ready(bucket, buffer=view, slots={s.item: s for s in slots})
            self._guard(lambda: self._own_parts(peer))
        self.stats.bytes_received += size

    def _broadcast(self, bucket: Bucket, ready: _Ready | None, what: str) -> None:
        segs, size = self._segments(bucket, self.rank)
        if ready is not None:
            assert ready.buffer is not None
            same = all(
                s.dtype == ready.slots[s.item].dtype
                and not s.part.transposed
                and s.part.src == ready.slots[s.item].part.src
                for s in segs
            ) and len(segs) == len(ready.slots)
            if same and ready.buffer.device == self.transport.device:
                buf = ready.buffer  # the read layout is the wire layout: no copy
            elif same:
                buf = self.comm_arenas.get("pack", size)
                buf.copy_(ready.buffer, non_blocking=True)
            else:
                buf = self._pack(ready, segs, size)
            self.transport.broadcast(buf, bucket.reader, what)
            self.stats.bytes_sent += size * (self.transport.world_size - 1)
        else:
            buf = self.comm_arenas.get("recv", size)
            self.transport.broadcast(buf, bucket.reader, what)
            self.stats.bytes_received += size
        self._guard(lambda: self._deliver(segs, buf))

    def _p2p(self, bucket: Bucket, ready: _Ready | None, what: str) -> None:
        """Each class of receivers gets its packed parts once. A class of several ranks is a
        multicast when the transport opened its group: the reader sends to the class's root
        (or is the root), which broadcasts inside the class; otherwise every member is sent
        the same packed buffer point to point. The reader sends to other classes first and
        broadcasts within its own class last, so no rank waits on a rank that waits on it."""
        if ready is not None:
            own: tuple[int, ...] = ()
            for members in bucket.classes:
                if self.rank in members:
                    own = members
                    continue
                segs, size = self._segments(bucket, members[0])
                buf = self._pack(ready, segs, size)
                multicast = self.multicast and len(members) > 1
                for peer in members[:1] if multicast else members:
                    self.transport.send(buf, peer, f"{what}: sending to rank {peer}")
                    self.stats.bytes_sent += size
            if len(own) > 1:
                segs, size = self._segments(bucket, self.rank)
                buf = self._pack(ready, segs, size)
                if self.multicast:
                    self.transport.group_broadcast(
                        buf, own, self.rank, f"{what}: multicast to ranks {list(own)}"
                    )
                    self.stats.bytes_sent += size * (len(own) - 1)
                else:
                    for peer in own[1:]:
                        self.transport.send(buf, peer, f"{what}: sending to rank {peer}")
                        self.stats.bytes_sent += size
            self._guard(lambda: self._own_parts(ready))
            return
        members = next((c for c in bucket.classes if self.rank in c), ())
        if not members:
            return
        segs, size = self._segments(bucket, self.rank)
        buf = self.comm_arenas.get("recv", size)
        root = members[0]
        if self.multicast and len(members) > 1:
            where = f"{what}: multicast within ranks {list(members)} from rank {root}"
            if root == self.rank:  # the relay: the reader is not a member of this class
                self.transport.recv(buf, bucket.reader, f"{what}: receiving")
                self.transport.group_broadcast(buf, members, root, where)
                self.stats.bytes_sent += size * (len(members) - 1)
            else:
                self.transport.group_broadcast(buf, members, root, where)
        else:
            self.transport.recv(buf, bucket.reader, f"{what}: receiving")
        self.stats.bytes_received += size
        self._guard(lambda: self._deliver(segs, buf))
