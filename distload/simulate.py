"""Predict a load's time, link traffic and memory from its plan and a bandwidth model.

Pure Python, no torch.distributed, run anywhere (``distload plan --simulate``): a plan for
512 ranks and a 405B checkpoint is built and simulated on a laptop, from shapes alone
(:func:`distload.shapes.model_index` makes the index of a real model family without any
file).

The model follows how :class:`~distload.execute.Executor` runs a plan:

* every reader reads its buckets in plan order; a shared bucket needs a staging arena, so it
  is read at most ``prefetch`` shared buckets ahead of the transfer of its oldest unsent one,
  while local buckets (read straight into their destinations) need none and are read as soon
  as the reader gets to them; readers of one node share that node's storage bandwidth
  (and, with shared storage, everyone shares its aggregate bandwidth);
* a shared bucket's transfer starts once its read is done, every participant (reader and
  receivers) has finished its earlier buckets and the NICs it uses are free; it lasts as long
  as its busiest link needs: the reader's NIC (bytes to other nodes), each receiving node's
  NIC, the intra-node link (bytes between ranks of one node), plus a fixed latency. Buckets
  of disjoint participants thus overlap; a broadcast, and every ``plan.check_every``-th shared
  bucket (a status check of all ranks), first waits for every rank;
* a broadcast reaches each node once over the network (a ring or tree, as NCCL and gloo do);
  point-to-point buckets send each class of receivers its parts once (to the class's root),
  and the root broadcasts them inside the class.

The result is compared with the physical lower bound
``max(bytes per node / node storage bandwidth, total bytes / aggregate storage bandwidth)``
(with the checkpoint read once per job, spread over the nodes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distload.geometry import piece_bytes, receiving_classes
from distload.plan import LoadPlan
from distload.planner import traffic

GB = 1e9


@dataclass(frozen=True)
class Bandwidths:
    """Link speeds in bytes/s (see ``distload plan --simulate --help`` for the flags)."""

    node_storage: float  # what one node reads from its storage (local disk or its share of NFS)
    shared_storage: float | None = None  # aggregate of a shared filesystem (None: node-local)
    nic: float = 25 * GB  # one node's network, each direction
    intra: float = 100 * GB  # between ranks of one node (NVLink, shared memory)
    latency: float = 50e-6  # fixed cost of one bucket's transfer, seconds
    prefetch: int = 3  # shared buckets a reader may read ahead (the executor's ring of arenas)


@dataclass
class Prediction:
    """What :func:`simulate` predicts for one plan."""

    seconds: float  # predicted wall time of the read + transfer phases
    lower_bound: float  # physical lower bound of reading the checkpoint once
    read_bytes_per_node: list[int]
    nic_bytes_out: list[int]  # per node, bytes sent to other nodes
    nic_bytes_in: list[int]  # per node, bytes received from other nodes
    intra_bytes: list[int]  # per node, bytes moved between its own ranks
    peak_rank_bytes: int  # largest final part + staging of any rank
    bottleneck: str  # the resource with the most busy time
    # seconds each resource is busy, for its busiest instance: storage = the busiest node's
    # reads, nic = the busiest NIC direction, intra-node = the rank sending most inside its
    # node, latency = the rank taking part in most transfers (and status checks)
    busy: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"predicted {self.seconds:.2f} s (lower bound {self.lower_bound:.2f} s, "
            f"{self.lower_bound / self.seconds:.0%} of it reached), bound by {self.bottleneck}"
        )


def _node_of(plan: LoadPlan) -> list[int]:
    return list(plan.nodes) if plan.nodes else [0] * plan.world_size


def _transfer_bytes(
    plan: LoadPlan, number: int, node: list[int]
) -> tuple[list[int], list[int], list[int], dict[int, int]]:
    """One shared bucket's traffic: NIC bytes out and in per node, bytes moved inside each
    node, and per sending rank the bytes it sends to ranks of its own node.

    Each receiving class is served as the executor does it: the reader sends the class's bytes
    to its root (unless it is the root), then the root broadcasts inside the class; a broadcast
    enters every other node of the class once (a ring or tree between nodes, as NCCL and gloo
    do) and reaches the remaining members of each node over the intra-node link.
    """
    bucket = plan.buckets[number]
    nodes = max(node) + 1
    out, inn, intra = [0] * nodes, [0] * nodes, [0] * nodes
    local_out: dict[int, int] = {}  # rank -> bytes it sends to ranks of its own node
    reader = bucket.reader

    def hop(src: int, dst: int, nbytes: int) -> None:
        if node[src] == node[dst]:
            intra[node[src]] += nbytes
            local_out[src] = local_out.get(src, 0) + nbytes
        else:
            out[node[src]] += nbytes
            inn[node[dst]] += nbytes

    for members, nbytes in receiving_classes(plan, number):
        if not nbytes:
            continue
        root = members[0]
        if root != reader:
            hop(reader, root, nbytes)
        if len(members) == 1:
            continue
        on: dict[int, list[int]] = {}
        for r in members:
            on.setdefault(node[r], []).append(r)
        ring = [node[root], *(n for n in on if n != node[root])]
        for n in ring[1:]:
            inn[n] += nbytes
        for n in ring[:-1]:  # every node of the ring but the last forwards one copy
            out[n] += nbytes
        for n, ranks in on.items():
            first = root if n == node[root] else ranks[0]
            for r in ranks:
                if r != first:
                    intra[n] += nbytes
            if len(ranks) > 1:  # a ring inside the node: each link carries one copy
                local_out[first] = local_out.get(first, 0) + nbytes
    return out, inn, intra, local_out


@dataclass
class _Links:
    """When each rank and each NIC direction is free, and the traffic so far (simulation)."""

    plan: LoadPlan
    bw: Bandwidths
    node: list[int]

    def __post_init__(self) -> None:
        nodes, world = max(self.node) + 1, self.plan.world_size
        self.nic_out, self.nic_in, self.intra = [0] * nodes, [0] * nodes, [0] * nodes
        self.rank_clock = [0.0] * world  # when each rank is done with its earlier buckets
        self.out_clock, self.in_clock = [0.0] * nodes, [0.0] * nodes
        self.local_sent = [0] * world
        self.steps = [0] * world  # transfers and status checks each rank takes part in

    def check(self) -> None:
        """A status check: every rank waits for all the others."""
        everyone = max(self.rank_clock) + self.bw.latency
        self.rank_clock = [everyone] * self.plan.world_size
        self.steps = [n + 1 for n in self.steps]

    def transfer(self, number: int, read_done: float) -> float:
        """Move shared bucket ``number`` once read; returns when its transfer ends."""
        out, inn, intra, local = _transfer_bytes(self.plan, number, self.node)
        for n in range(len(out)):
            self.nic_out[n] += out[n]
            self.nic_in[n] += inn[n]
            self.intra[n] += intra[n]
        for r, sent in local.items():
            self.local_sent[r] += sent
        ranks = self.plan.buckets[number].participants(self.plan.world_size)
        sending = [n for n in range(len(out)) if out[n]]
        receiving = [n for n in range(len(out)) if inn[n]]
        begin = max(
            read_done,
            *(self.rank_clock[r] for r in ranks),
            *(self.out_clock[n] for n in sending),
            *(self.in_clock[n] for n in receiving),
        )
        net = max(*out, *inn) / self.bw.nic
        duration = max(net, max(local.values(), default=0) / self.bw.intra) + self.bw.latency
        end = begin + duration
        for r in ranks:
            self.rank_clock[r] = end
            self.steps[r] += 1
        for n in sending:
            self.out_clock[n] = end
        for n in receiving:
            self.in_clock[n] = end
        return end


def simulate(plan: LoadPlan, bw: Bandwidths) -> Prediction:
    """Predict ``plan``'s read + transfer time under ``bw`` (pure; any world size)."""
    node = _node_of(plan)
    nodes = max(node) + 1
    reading = {b.reader for b in plan.buckets}
    # each node's storage serves its readers' requests one after the other at its full rate
    # (work-conserving); a shared filesystem caps each reading node at its share
    nodes_reading = len({node[r] for r in reading}) or 1
    rate = bw.node_storage
    if bw.shared_storage is not None:
        rate = min(rate, bw.shared_storage / nodes_reading)
    storage_clock = [0.0] * nodes
    reader_clock = dict.fromkeys(reading, 0.0)
    # a reader may start shared bucket k only once its shared bucket (k - prefetch) of its own
    # is moved on (the ring of staging arenas); local buckets need no arena
    own: dict[int, list[int]] = {r: [] for r in reading}
    for k, b in enumerate(plan.buckets):
        if b.kind != "local":
            own[b.reader].append(k)
    position = {k: i for r in reading for i, k in enumerate(own[r])}
    finished = [0.0] * len(plan.buckets)  # when each bucket's transfer (or local copy) ends
    read_bytes_node = [0] * nodes
    links = _Links(plan, bw, node)
    checks = plan.status_checks()
    for k, b in enumerate(plan.buckets):
        nbytes = sum(piece_bytes(plan.tensors[i.tensor], i) for i in b.items)
        read_bytes_node[node[b.reader]] += nbytes
        i = position.get(k, 0)
        gated = b.kind != "local" and i >= bw.prefetch
        gate = finished[own[b.reader][i - bw.prefetch]] if gated else 0.0
        start = max(reader_clock[b.reader], gate, storage_clock[node[b.reader]])
        read_done = start + nbytes / rate
        storage_clock[node[b.reader]] = reader_clock[b.reader] = read_done
        if b.kind == "local":
            finished[k] = read_done
            continue
        if k in checks:
            links.check()
        finished[k] = links.transfer(k, read_done)
    seconds = max([*links.rank_clock, *reader_clock.values()], default=0.0)
    return _prediction(plan, bw, links, read_bytes_node=read_bytes_node, rate=rate, seconds=seconds)


def _prediction(
    plan: LoadPlan,
    bw: Bandwidths,
    links: _Links,
    *,
    read_bytes_node: list[int],
    rate: float,
    seconds: float,
) -> Prediction:
    busy = {
        # storage is busy for the bytes its node reads (waiting on transfers is not storage)
        "storage": max(read_bytes_node) / rate if read_bytes_node else 0.0,
        "nic": max(*links.nic_out, *links.nic_in) / bw.nic,
        "intra-node": max(links.local_sent) / bw.intra,
        "latency": max(links.steps) * bw.latency,
    }
    total = plan.index.total_bytes
    lower = total / len(read_bytes_node) / bw.node_storage
    if bw.shared_storage is not None:
        lower = max(lower, total / bw.shared_storage)
    peak = max((s.held + s.staging for s in traffic(plan)), default=0)
    return Prediction(
        seconds=seconds,
        lower_bound=lower,
        read_bytes_per_node=read_bytes_node,
        nic_bytes_out=links.nic_out,
        nic_bytes_in=links.nic_in,
        intra_bytes=links.intra,
        peak_rank_bytes=peak,
        bottleneck=max(busy, key=lambda key: busy[key]),
        busy=busy,
    )
