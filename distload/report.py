"""The load report: what each rank read, sent, received and held, and how long each phase took."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the report itself needs neither the plan's module nor torch
    from distload.plan import LoadPlan

# the columns of the report's timing table, in the order the phases run
PHASE_COLUMNS = (
    "runtime",
    "plan",
    "download",
    "materialize",
    "read",
    "transfer",
    "execute",
    "total",
)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


@dataclass
class RankReport:
    """One rank's figures for one load."""

    rank: int
    bytes_read: int = 0  # bytes this rank read from storage
    bytes_sent: int = 0  # bytes this rank sent to peers
    bytes_received: int = 0  # bytes this rank received from peers
    bytes_held: int = 0  # bytes of the tensors this rank ends with
    peak_staging_bytes: int = 0  # largest staging memory (arenas) this rank used
    bytes_downloaded: int = 0  # bytes this rank fetched from the Hub (cache hits count 0)
    bytes_copied: int = 0  # bytes this rank's CPU copied (host destinations, packing)
    bytes_kernel_copied: int = 0  # bytes the kernel copied for it (reads via the page cache)
    bytes_direct: int = 0  # bytes of bytes_read read with O_DIRECT (bypassing the page cache)
    # shared buckets this rank took part in (with the transport, p2p buckets between other
    # ranks are skipped: they move meanwhile)
    shared_buckets: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    # CPU seconds (user + system) of this rank's process during the load: all its threads
    # (the load's reader threads, and any other the process runs meanwhile)
    cpu_seconds: float = 0.0
    # operations this rank waited on over the transport before the closing exchange of
    # reports (collectives and point-to-point transfers: the transport's count)
    operations: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def from_json(data: bytes) -> RankReport:
        return RankReport(**json.loads(data.decode()))


@dataclass
class LoadReport:
    """Figures of every rank of one load (identical on all ranks)."""

    source: str
    world_size: int
    total_bytes: int  # bytes of the checkpoint's loaded tensors
    tensors: int
    buckets: int
    placement: str
    nodes: int  # number of nodes the group spans
    ranks: list[RankReport]
    wall_seconds: float  # slowest rank, from the start of the load to its end
    # how shared buckets moved: "none" (one rank), "shared memory" (with ", page cache for
    # <n> of <m> shared buckets" where each rank read those from the page cache itself),
    # "point to point" or "multicast (<n> groups)" (receivers served through sub-groups)
    exchange: str = "none"
    commit: str | None = None  # Hub sources: the commit every rank loaded
    hub_cache: str | None = None  # Hub sources: "shared" or "<n> caches"

    @property
    def bytes_downloaded(self) -> int:
        return sum(r.bytes_downloaded for r in self.ranks)

    def _hub_line(self) -> str:
        if self.commit is None:
            return ""
        return (
            f"  commit {self.commit}, Hub cache: {self.hub_cache}, downloaded "
            f"{human_bytes(self.bytes_downloaded)}\n"
        )

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.ranks)

    @property
    def bytes_held(self) -> int:
        return sum(r.bytes_held for r in self.ranks)

    @property
    def bytes_direct(self) -> int:
        """Bytes of :attr:`bytes_read` read with ``O_DIRECT`` (the rest through the page
        cache)."""
        return sum(r.bytes_direct for r in self.ranks)

    def _read_path(self) -> str:
        """The read path's clause of the table's head: how much bypassed the page cache."""
        if not self.bytes_read:
            return ""
        return f", {self.bytes_direct / self.bytes_read:.0%} with O_DIRECT"

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) of every rank's process during the load."""
        return sum(r.cpu_seconds for r in self.ranks)

    @property
    def cpu_copies_per_byte(self) -> float:
        """Bytes copied by the CPU (distload's copies plus the kernel's page-cache copies of
        buffered reads) per byte delivered into the ranks' destinations, over all ranks."""
        copied = sum(r.bytes_copied + r.bytes_kernel_copied for r in self.ranks)
        return copied / max(1, self.bytes_held)

    def table(self) -> str:
        """A printable table, one row per rank."""
        head = (
            f"distload: {self.tensors} tensors, {human_bytes(self.total_bytes)} from "
            f"{self.source}\n{self._hub_line()}  placement: {self.placement}\n"
            f"  world {self.world_size} on "
            f"{self.nodes} node(s), "
            f"{self.buckets} buckets ({self.exchange}), {self.wall_seconds:.2f} s (slowest "
            "rank), read "
            f"{human_bytes(self.bytes_read)} "
            f"({self.bytes_read / max(1, self.total_bytes):.2f}x the checkpoint"
            f"{self._read_path()}), "
            f"{self.cpu_copies_per_byte:.2f} CPU copies per delivered byte, "
            f"{self.cpu_seconds:.2f} CPU s over all ranks"
        )
        seen = {p for r in self.ranks for p in r.seconds}
        phases = [p for p in PHASE_COLUMNS if p in seen] + sorted(seen - set(PHASE_COLUMNS))
        cols = ["rank", "read", "sent", "received", "held", "staging", "ops", "cpu", *phases]
        rows = [
            [
                str(r.rank),
                human_bytes(r.bytes_read),
                human_bytes(r.bytes_sent),
                human_bytes(r.bytes_received),
                human_bytes(r.bytes_held),
                human_bytes(r.peak_staging_bytes),
                str(r.operations),
                f"{r.cpu_seconds:.3f}s",
                *(f"{r.seconds.get(p, 0.0):.3f}s" for p in phases),
            ]
            for r in self.ranks
        ]
        widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
        return head + "\n" + "\n".join("  " + line for line in lines)


class PhaseClock:
    """Seconds per phase of one load on one rank (``lap`` ends the running phase)."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.cpu_start = time.process_time()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self.mark
        self.mark = now

    def record(self, phase: str, seconds: float) -> None:
        """A part of a phase timed elsewhere (e.g. the read-ahead thread's reads)."""
        self.seconds[phase] = seconds

    def finish(self) -> dict[str, float]:
        self.seconds["total"] = time.perf_counter() - self.start
        return self.seconds

    def cpu(self) -> float:
        """CPU seconds of this process since the clock started (every thread)."""
        return time.process_time() - self.cpu_start


@dataclass(frozen=True)
class LoadFacts:
    """What the report says of the load as a whole (the same on every rank)."""

    source: str
    world_size: int
    total_bytes: int
    tensors: int
    buckets: int
    placement: str
    nodes: Collection[int]
    exchange: str
    commit: str | None = None
    hub_cache: str | None = None

    @classmethod
    def of(cls, plan: LoadPlan, source: str, exchange: str) -> LoadFacts:
        """The facts of a load of ``plan`` from ``source`` (as the caller named it; a Hub
        source: its resolved URL and commit), ``exchange`` naming how buckets moved."""
        stored = {link.stored for _, link in plan.links}
        hub = plan.hub
        return cls(
            source=hub.resolved.ref.url() if hub is not None else source,
            commit=hub.resolved.commit if hub is not None else None,
            hub_cache=hub.mode if hub is not None else None,
            world_size=plan.world_size,
            total_bytes=sum(plan.tensors[s].nbytes for s in stored),
            tensors=len(plan.outputs),
            buckets=len(plan.buckets),
            placement=plan.placement,
            nodes=plan.nodes,
            exchange=exchange,
        )


def load_report(facts: LoadFacts, ranks: list[RankReport]) -> LoadReport:
    """The report of one load from every rank's figures (after the closing exchange)."""
    return LoadReport(
        source=facts.source,
        commit=facts.commit,
        hub_cache=facts.hub_cache,
        world_size=facts.world_size,
        total_bytes=facts.total_bytes,
        tensors=facts.tensors,
        buckets=facts.buckets,
        placement=facts.placement,
        exchange=facts.exchange,
        nodes=len(set(facts.nodes)) or 1,
        ranks=ranks,
        wall_seconds=max(r.seconds.get("total", 0.0) for r in ranks),
    )
