"""The execute loop: every bucket of the plan, in its one global order, on one rank.

* a ``local`` bucket concerns its reader only (no communication); pieces that land unchanged
  in a contiguous region of the destination are read straight into it;
* a shared bucket of files every node holds in its page cache is read by every rank that
  needs it, each its own parts (``distload.execute.pagecache``): no reader, no transfer;
* other ``broadcast`` and ``p2p`` buckets move over the transport or through shared memory
  (``distload.execute.exchange``); a ``p2p`` bucket involves only its *participants* (reader
  and receivers): other ranks go straight on, so buckets with disjoint participants (pipeline
  stages, data-parallel replicas) move at the same time. Every rank still takes its buckets in
  the global order, so the lowest unfinished bucket always has all its participants at it;
* all ranks agree on a status flag (one small ``all_reduce``) before every
  ``plan.check_every``-th shared bucket (and, over the transport, before every broadcast
  bucket), so a failure ends the load everywhere within a bounded number of buckets; a rank
  that fails between two checks keeps to the schedule (``distload.execute.status``).

A background thread (``distload.execute.reader``) reads this rank's upcoming buckets into a
ring of staging arenas while the main thread transfers the current one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from distload.arenas import Arenas
from distload.coordination import agree
from distload.errors import DistLoadError, failure_from_exception
from distload.execute.copies import Copier
from distload.execute.exchange import ShmBuckets, TransportExchange
from distload.execute.pagecache import PageCacheBuckets
from distload.execute.reader import Outcome, Read, ReadAhead, ReadFailure
from distload.execute.status import ExecStats, Status, describe
from distload.plan import Bucket, LoadPlan
from distload.shm import ShmExchange
from distload.storage import FileReader
from distload.transport.base import Transport


class Executor:
    """Runs one plan on one rank.

    Call order: construct on every rank of the group (no communication), then :meth:`run` on
    every rank together -- a collective over the whole group, bucket by bucket. The caller
    owns the resources passed in (reader, arenas, shared-memory exchange) and releases them
    (``distload.execute.run``); after :meth:`run`, :attr:`status` holds a failure not yet
    shared (the caller's closing agreement shares it).
    """

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
        cached: frozenset[int] = frozenset(),
        multicast: bool = False,
        inline: bool = False,
    ) -> None:
        self.plan, self.transport, self.rank = plan, transport, transport.rank
        self.dests, self.reader = dests, reader
        self.host_arenas, self.comm_arenas = host_arenas, comm_arenas
        self.on_bucket = on_bucket
        self.stats = ExecStats()
        self.status = Status()
        self.copier = Copier(plan, self.rank, dests)
        self.net = TransportExchange(
            transport, self.copier, self.status, self.stats, comm_arenas, multicast=multicast
        )
        self.shm = (
            ShmBuckets(shm, self.copier, self.status, self.stats) if shm is not None else None
        )
        self._shm = shm
        # buckets every rank reads from the page cache itself (no reader, no transfer), as
        # ``distload.execute.run.ExecutePhase`` decided them: none by default
        self.cached = cached
        self.page_cache = (
            PageCacheBuckets(self.copier, self.status, self.stats, reader) if self.cached else None
        )
        # buckets a status check precedes
        self.checks = plan.status_checks(shm=shm is not None, cached=self.cached)
        # read each bucket on this thread when asked (``distload.execute.run.inline_reads``)
        self.inline = inline

    @property
    def pending(self) -> BaseException | None:
        """A local failure not yet shared with the peers."""
        return self.status.pending

    def _cuda_device(self) -> torch.device | None:
        """The CUDA device this rank's destinations live on (copies from pinned arenas into it
        are asynchronous), or None."""
        if self.comm_arenas.device.type == "cuda":
            return self.comm_arenas.device
        return next((d.device for d in self.dests.values() if d.device.type == "cuda"), None)

    def run(self) -> ExecStats:
        """Collective: take part in every bucket of the plan, in order (all ranks)."""
        prefetch = ReadAhead(
            self.plan,
            self.rank,
            reader=self.reader,
            arenas=self.host_arenas,
            direct_targets=self.copier.direct_targets,
            shm=self._shm,
            skip=self.cached,
            cuda=self._cuda_device(),
            inline=self.inline,
        )
        try:
            for number, bucket in enumerate(self.plan.buckets):
                self.status.begin_bucket()
                reads = bucket.reader == self.rank and number not in self.cached
                outcome = prefetch.next(bucket) if reads else None
                try:
                    self._guarded_step(number, bucket, outcome)
                finally:
                    if outcome is not None:  # this rank's read of the bucket is done with
                        prefetch.release(outcome)
                self._progress(number)
        finally:
            prefetch.stop()
            if self.page_cache is not None:
                self.page_cache.close()
        self.stats.bytes_read = self.reader.bytes_read
        self.stats.bytes_kernel_copied = self.reader.bytes_kernel_copied
        self.stats.bytes_direct = self.reader.bytes_direct
        if self.page_cache is not None:  # read by every rank for itself
            self.stats.bytes_read += self.page_cache.bytes_read
            self.stats.bytes_kernel_copied += self.page_cache.bytes_kernel_copied
        # O_DIRECT reads: this rank's copies out of its bounce buffers
        self.stats.bytes_copied = self.copier.copied + self.reader.bytes_bounced
        self.stats.read_seconds = prefetch.stats.seconds
        if self.comm_arenas.device.type == "cuda":
            torch.cuda.synchronize(self.comm_arenas.device)
        return self.stats

    def _progress(self, number: int) -> None:
        """The caller's per-bucket callback; one that raises fails the load like any other
        error (shared with every rank at the next agreement) and is not called again."""
        if self.on_bucket is None:
            return
        try:
            self.on_bucket(number)
        except Exception as exc:
            self.on_bucket = None
            self.status.keep(exc, "transfer")

    def _guarded_step(self, number: int, bucket: Bucket, outcome: Outcome | None) -> None:
        """One bucket; a failure is raised at once when peers are inside this bucket's
        transfer, shared at this bucket's status check, or else kept for the next one."""
        try:
            self._step(number, bucket, outcome)
        except DistLoadError:
            raise
        except Exception as exc:
            if self.status.agreed or self.status.moving:  # peers are inside this transfer
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
            self.status.keep(exc, "transfer")
            self._keep_schedule(number, bucket, outcome)

    def _step(self, number: int, bucket: Bucket, outcome: Outcome | None) -> None:
        """Take part in one bucket (``outcome``: this rank's read of it, as its reader)."""
        read = outcome if isinstance(outcome, Read) else None
        if isinstance(outcome, ReadFailure):
            if outcome.fatal:
                raise outcome.error  # the reader thread found a peer gone: no one to tell
            self.status.keep(outcome.error, "read")
        if bucket.kind == "local":
            if read is not None:
                self.status.guard(lambda: self.copier.own_parts(number, read))
            return
        if number in self.checks:
            # a peer lost here may have been lost in an earlier transfer (shared memory has
            # no collective of its own) or in its reads
            phase = "transfer" if self.status.collective_free else "read"
            agree(self.transport, phase, self.status.pending)
            self.status.agreed = True
        cached = number in self.cached
        if (
            self.shm is None
            and not cached
            and self.rank not in bucket.participants(self.transport.world_size)
        ):
            return  # a p2p bucket between other ranks: they move it meanwhile
        start = time.perf_counter()
        if cached or self.shm is not None:
            self.status.collective_free = True
            self._local_step(number, bucket, read, cached=cached)
        else:
            self.status.moving = True
            if bucket.kind == "broadcast":
                self.net.broadcast(number, bucket, read, describe(number, bucket))
            else:
                self.net.p2p(number, bucket, read, describe(number, bucket))
        self.stats.transfer_seconds += time.perf_counter() - start
        self.stats.buckets += 1

    def _local_step(self, number: int, bucket: Bucket, read: Read | None, *, cached: bool) -> None:
        """A shared bucket with no collective inside it (through shared memory, or read from
        the page cache by every rank), so a failure is shared at the next status check (or
        the closing agreement); a peer found gone (PeerError) ends the load at once. Copies
        or not, this rank marks a shared-memory slot done."""
        try:
            if cached:
                assert self.page_cache is not None
                self.page_cache.bucket(number, bucket)
            else:
                assert self.shm is not None
                self.shm.bucket(number, bucket, read)
        except DistLoadError:
            raise
        except Exception as exc:
            self.status.keep(exc, "transfer")
        finally:
            if not cached and self.shm is not None:
                self.shm.shm.mark_done(number, bucket.reader)

    def _keep_schedule(self, number: int, bucket: Bucket, outcome: Outcome | None) -> None:
        """After a local failure in a bucket no status check precedes: take part in its
        transfers anyway (sends unfilled, receives dropped, since ``pending`` is set), so no
        peer waits on this rank before the next check shares the failure."""
        if number in self.cached:
            return  # read from the page cache: no peer waits on this rank in it
        if bucket.kind == "p2p" and self.rank in bucket.participants(self.transport.world_size):
            self.status.moving = True
            read = outcome if isinstance(outcome, Read) else None
            self.net.p2p(number, bucket, read, describe(number, bucket))
