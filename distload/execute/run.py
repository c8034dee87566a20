"""The execute phase's resources, owned in one place and released on every path.

Runs on every rank. :class:`ExecutePhase` is a context manager entered once the plan is known:

1. :meth:`ExecutePhase.materialize` (collective) builds this rank's destinations and, when
   shared buckets go through shared memory, creates this rank's slots, maps every peer's and
   removes the files (the mappings stay valid; nothing is left in ``/dev/shm`` even if the
   whole job is killed later);
2. :meth:`ExecutePhase.run` (collective) opens the multicast groups and runs the
   :class:`~distload.execute.executor.Executor` with a file reader and staging arenas; a
   failure on this rank is kept, not raised (peers may still be copying from it);
3. :meth:`ExecutePhase.close` (collective) is the phase's one closing step: an all_gather of
   every rank's report -- or of its failure, so every rank returns the same success or raises
   the same error, for one collective either way;
4. leaving the context closes the groups and the shared memory; after a failure
   this rank's abort word tells peers waiting on it to stop, and the survivors also remove the
   shared-memory files of peers that may have died.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from distload.arenas import Arenas
from distload.coordination import agree, gather_or_fail
from distload.errors import DistLoadError
from distload.execute.executor import Executor
from distload.execute.pagecache import page_cached
from distload.execute.reader import PREFETCH_DEPTH
from distload.execute.status import ExecStats
from distload.plan import LoadPlan
from distload.shm import ShmExchange
from distload.storage import FileReader
from distload.transport.base import Transport

T = TypeVar("T")
# the staging budget in buckets: the read ring, one receive and one pack buffer, and the read
# threads' O_DIRECT bounce buffers (one bucket in all, see distload.directio)
STAGING_ARENAS = PREFETCH_DEPTH + 3


@dataclass(frozen=True)
class ExecResult:
    """What the execute phase did on this rank."""

    stats: ExecStats
    staging_bytes: int  # peak staging memory: arenas plus the shared-memory slots it created
    exchange: str  # how shared buckets moved (the report's wording)
    pending: BaseException | None = None  # this rank's failure, shared by ExecutePhase.close


def needs_slots(plan: LoadPlan, cached: frozenset[int]) -> bool:
    """Whether some shared bucket moves through a slot (is not read from the page cache)."""
    return any(b.kind != "local" and n not in cached for n, b in enumerate(plan.buckets))


def inline_reads(plan: LoadPlan, rank: int, cached: frozenset[int], *, shm: bool) -> bool:
    """Whether this rank reads its buckets on its main thread, with no read-ahead thread and
    no read pool: when nothing moves between ranks (every shared bucket read from the page
    cache by every rank, so there is no transfer to overlap reads with) and this node runs at
    least as many ranks as this process may use cores (threads would only take turns with
    the main thread for the same cores, handing the interpreter lock back and forth).
    ``DISTLOAD_INLINE_READS=0`` / ``1`` decides instead (this rank only)."""
    knob = os.environ.get("DISTLOAD_INLINE_READS", "auto")
    if knob in ("0", "1"):
        return knob == "1"
    if shm or needs_slots(plan, cached):
        return False
    nodes = plan.nodes or (0,) * plan.world_size
    here = sum(1 for node in nodes if node == nodes[rank])
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        cores = os.cpu_count() or 1
    return here >= cores


def use_shm(choice: bool | None, plan: LoadPlan, device: torch.device) -> bool:
    """Whether shared buckets go through shared memory (same decision on every rank: it
    depends on the plan and the transport's device only)."""
    one_node = plan.world_size > 1 and len(set(plan.nodes)) == 1
    if choice is None:
        return one_node and device.type == "cpu"
    if choice and not (one_node and device.type == "cpu"):
        raise DistLoadError(
            "shm=True needs every rank on one node and a host-memory transport (gloo, MPI)",
            phase="materialize",
        )
    return choice


class ExecutePhase:
    """This rank's resources for executing one plan (see the module docstring)."""

    def __init__(self, plan: LoadPlan, net: Transport, *, shm: bool | None, timeout: float) -> None:
        self.plan, self.net, self.timeout = plan, net, timeout
        # one node, host memory: shared buckets go through shared memory or the page cache
        self.shm = use_shm(shm, plan, net.device)
        # the buckets every rank reads from the page cache itself (no transfer)
        self.cached = page_cached(plan, net.device, shm=self.shm)
        self.exchange: ShmExchange | None = None

    def __enter__(self) -> ExecutePhase:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        if self.exchange is None:
            return
        if exc is not None:  # peers waiting on this rank stop waiting, and blame the same
            self.exchange.abort(exc.ranks if isinstance(exc, DistLoadError) else ())
        # after a failure a peer may be dead: survivors also remove its shared-memory files
        self.exchange.close(purge=exc is not None)
        self.exchange = None

    def materialize(self, make_dests: Callable[[], T]) -> T:
        """Collective: this rank's destinations (``make_dests``) and shared-memory slots (none
        when every shared bucket is read from the page cache: then no rank needs a slot, and
        the second agreement, after mapping them, is not needed either)."""
        error: BaseException | None = None
        dests: T | None = None
        try:
            dests = make_dests()
            if self.shm and needs_slots(self.plan, self.cached):
                self.exchange = ShmExchange(self.plan, self.net.rank, timeout=self.timeout)
        except Exception as exc:
            error = exc
        agree(self.net, "materialize", error)
        if self.exchange is not None:
            try:  # every rank maps every slot now, then the files are removed
                self.exchange.attach()
            except Exception as exc:
                error = exc
            agree(self.net, "materialize", error)
            self.exchange.unlink_own()
        assert dests is not None  # the agreement raised otherwise
        return dests

    def _open_multicast(self) -> bool:
        """Collective: open the sub-groups the plan multicasts to, when it asks for them (not
        with shared memory, where ranks copy from the reader's slot). False also where the
        transport cannot open groups (MPI, a caller's sub-group): classes are then sent to
        member by member."""
        groups = self.plan.multicast_groups(skip=self.cached)
        if self.shm or not groups or not self.plan.multicast:
            return False
        error: BaseException | None = None
        opened = False
        try:
            opened = self.net.open_groups(groups, "transfer: opening multicast groups")
        except Exception as exc:
            error = exc
        agree(self.net, "transfer", error)
        return opened

    def run(
        self,
        dests: dict[int, torch.Tensor],
        *,
        root: str | Path,
        contain: Path | None,
        read_threads: int,
        direct_io: bool = True,
        on_bucket: Callable[[int], None] | None,
        after: Callable[[], None] | None = None,
    ) -> ExecResult:
        """Collective: read, move and copy every bucket; ``after`` (local checks once every
        byte is in, e.g. declared ties) runs last. A failure on this rank is returned in
        :attr:`ExecResult.pending` for :meth:`close` to share."""
        host = Arenas(torch.device("cpu"), pin=self.net.device.type == "cuda")
        comm = Arenas(self.net.device) if self.net.device.type == "cuda" else host
        expect = {f.name: f for f in self.plan.index.files}
        inline = inline_reads(self.plan, self.net.rank, self.cached, shm=self.exchange is not None)
        reader = FileReader(
            root,
            threads=0 if inline else read_threads,
            contain=contain,
            expect=expect,
            direct=direct_io,
            resident=self.plan.cached_files,
            bounce_budget=self.plan.bucket_bytes,
        )
        try:
            multicast = self._open_multicast()
            executor = Executor(
                self.plan,
                self.net,
                dests,
                reader,
                host_arenas=host,
                comm_arenas=comm,
                on_bucket=on_bucket,
                shm=self.exchange,
                cached=self.cached,
                multicast=multicast,
                inline=inline,
            )
            stats = executor.run()
            error = executor.pending
            if error is None and after is not None:
                try:
                    after()
                except Exception as exc:  # shared with every rank by close()
                    error = exc
        finally:
            reader.close()
            self.net.close_groups()
        staging = host.nbytes + (comm.nbytes if comm is not host else 0) + reader.bounce_bytes
        if self.exchange is not None:
            staging += self.exchange.nbytes
        host.clear()
        comm.clear()
        return ExecResult(stats, staging, self._mode(multicast), error)

    def close(self, result: ExecResult, report: Callable[[], bytes]) -> list[bytes]:
        """Collective: every rank's ``report`` (this rank's, made once its bytes are in), or,
        if ``result`` holds a failure on any rank, the same error raised on every rank."""

        def mine() -> bytes:
            if result.pending is not None:
                raise result.pending
            return report()

        return gather_or_fail(self.net, "close", mine)

    def _mode(self, multicast: bool) -> str:
        """How shared buckets moved, for the report: ``shared memory``, ``multicast (N
        groups)`` or ``point to point``, and ``page cache for N of M shared buckets`` when
        some were read from the page cache by every rank (only that, when all were)."""
        if self.plan.world_size == 1:
            return "none"
        cached = self.cached
        if self.shm:
            way = "shared memory"
        elif multicast:
            way = f"multicast ({len(self.plan.multicast_groups(skip=cached))} groups)"
        else:
            way = "point to point"
        if not cached:
            return way
        shared = sum(1 for b in self.plan.buckets if b.kind != "local")
        page = f"page cache for {len(cached)} of {shared} shared buckets"
        return page if len(cached) == shared else f"{way}, {page}"
