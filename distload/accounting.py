"""Per-rank byte accounting of a plan: what each rank reads, sends, receives and holds.

Pure; used by ``distload plan`` (printed tables), the simulator's checks and the tests that pin
the load report's figures against the plan's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distload.dtypes import ITEMSIZE
from distload.geometry import piece_bytes, read_bytes, receiving_classes
from distload.pieces import chunk_table
from distload.placement.base import Layout, box_shape, holders, local_box
from distload.plan import LoadPlan


@dataclass(frozen=True)
class RankTraffic:
    """Bytes one rank reads, sends, receives and finally holds under a plan."""

    rank: int
    read: int
    sent: int
    received: int
    held: int
    staging: int  # largest staging buffer this rank needs, in bytes


def traffic(
    plan: LoadPlan, *, multicast: bool = True, page_cached: frozenset[int] = frozenset()
) -> list[RankTraffic]:
    """Per-rank byte accounting of a plan (what ``distload plan`` prints).

    With ``multicast`` a class of several receivers is served as the executor does when the
    transport opened its group: the reader sends its bytes once (to the class's root, or
    within the class when it is a member itself) and the root sends one copy to every other
    member, as a broadcast inside the class does logically. Without, the reader sends to
    every member (shared memory, or a transport without sub-groups). Buckets of
    ``page_cached`` (``distload.execute.pagecache``) count as read by their reader -- once per
    job, as the page cache filled once -- and move nothing between ranks: every rank reads
    its own parts.
    """
    world = plan.world_size
    read, sent, recv, staging = [0] * world, [0] * world, [0] * world, [0] * world
    for number, bucket in enumerate(plan.buckets):
        size = read_bytes(plan, bucket)
        read[bucket.reader] += sum(piece_bytes(plan.tensors[i.tensor], i) for i in bucket.items)
        if number in page_cached:
            continue
        staging[bucket.reader] = max(staging[bucket.reader], size)
        for members, nbytes in receiving_classes(plan, number):
            if multicast or bucket.kind == "broadcast":
                root = members[0]
                if root != bucket.reader:
                    sent[bucket.reader] += nbytes
                sent[root] += nbytes * (len(members) - 1)
            else:
                sent[bucket.reader] += nbytes * sum(1 for r in members if r != bucket.reader)
            for rank in members:
                if rank == bucket.reader:
                    continue
                recv[rank] += nbytes
                staging[rank] = max(staging[rank], nbytes)
    # held: bytes per chunk summed over the outputs of each layout, then spread over the
    # ranks once per layout (not once per output and rank)
    per_chunk: dict[Layout, list[int]] = {}
    for out, output in enumerate(plan.outputs):
        layout = plan.layouts[out]
        sums = per_chunk.setdefault(layout, [0] * layout.chunks)
        itemsize = ITEMSIZE[plan.dtypes[out]]
        ranks = holders(layout, world)
        for chunk in range(min(len(ranks), layout.chunks if layout.dim is not None else 1)):
            box = local_box(output.shape, layout, ranks[chunk])
            assert box is not None
            sums[chunk] += math.prod(box_shape(box)) * itemsize
    held = [0] * world
    for layout, sums in per_chunk.items():
        for rank, chunk in enumerate(chunk_table(layout, world)):
            if chunk >= 0:
                held[rank] += sums[chunk]
    return [RankTraffic(r, read[r], sent[r], recv[r], held[r], staging[r]) for r in range(world)]
