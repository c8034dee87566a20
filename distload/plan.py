"""The load plan: frozen dataclasses, JSON (de)serialisation, and the pure geometry derived from it.

The coordinator builds one :class:`LoadPlan` (see ``distload.planner``) and broadcasts it as
JSON; every rank then derives from it, with the pure functions below, exactly which bytes it
reads, sends and receives in each bucket. Nothing here imports torch, so a plan can be built,
printed and tested with plain integers for the world size.

Vocabulary:

* a *piece* (:class:`Item`) is a run of rows ``[start, stop)`` along dim 0 of one tensor -- a
  contiguous byte range of the file; large tensors are cut into pieces so that buffers stay
  bounded, and dim-0 shards are cut at chunk boundaries;
* a *part* (:class:`Part`) is the region of one piece that one rank holds;
* a *bucket* (:class:`Bucket`) is a set of pieces read by one reader rank and moved together in
  one step of the global order: ``local`` (only the reader needs them; no communication),
  ``broadcast`` (every rank needs all of them in full) or ``p2p`` (each rank receives only its
  parts, sent point to point by the reader).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from distload.checkpoint import CheckpointIndex, TensorMeta
from distload.dtypes import ITEMSIZE
from distload.placement.base import Box, Layout, box_shape, local_box

ALIGN = 64  # byte alignment of every segment inside a staging buffer
BucketKind = Literal["local", "broadcast", "p2p"]


@dataclass(frozen=True)
class Item:
    """One piece: rows ``[start, stop)`` along dim 0 of tensor ``tensor`` (0-d: rows 0..1)."""

    tensor: int  # index into ``LoadPlan.index.tensors``
    start: int  # first row
    stop: int  # one past the last row


@dataclass(frozen=True)
class Bucket:
    """Pieces read by ``reader`` and moved in one step of the global order."""

    kind: BucketKind  # "local" | "broadcast" | "p2p"
    reader: int  # group rank that reads these pieces from storage
    items: tuple[Item, ...]  # in file order


@dataclass(frozen=True)
class LoadPlan:
    """Everything every rank needs to run a load, identical on all ranks."""

    world_size: int  # size of the load's group
    bucket_bytes: int  # target size of one bucket (staging buffers are sized from it)
    index: CheckpointIndex  # the validated checkpoint
    layouts: tuple[Layout, ...]  # per tensor (parallel to index.tensors)
    dtypes: tuple[str, ...]  # destination dtype per tensor (safetensors names)
    buckets: tuple[Bucket, ...]  # the one global order of work
    placement: str  # human-readable description of the placement used
    skipped: tuple[str, ...] = ()  # checkpoint tensors not loaded (filtered out by name)

    @property
    def tensors(self) -> tuple[TensorMeta, ...]:
        return self.index.tensors

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "world_size": self.world_size,
                "bucket_bytes": self.bucket_bytes,
                "index": self.index.to_json(),
                "layouts": [lay.to_json() for lay in self.layouts],
                "dtypes": list(self.dtypes),
                "buckets": [
                    [b.kind, b.reader, [[i.tensor, i.start, i.stop] for i in b.items]]
                    for b in self.buckets
                ],
                "placement": self.placement,
                "skipped": list(self.skipped),
            },
            separators=(",", ":"),
        ).encode()

    @staticmethod
    def from_json(data: bytes) -> LoadPlan:
        raw: dict[str, Any] = json.loads(data.decode())
        return LoadPlan(
            world_size=raw["world_size"],
            bucket_bytes=raw["bucket_bytes"],
            index=CheckpointIndex.from_json(raw["index"]),
            layouts=tuple(Layout.from_json(x) for x in raw["layouts"]),
            dtypes=tuple(raw["dtypes"]),
            buckets=tuple(
                Bucket(kind, reader, tuple(Item(*i) for i in items))
                for kind, reader, items in raw["buckets"]
            ),
            placement=raw["placement"],
            skipped=tuple(raw.get("skipped", ())),
        )

    def local_shape(self, tensor: int, rank: int) -> tuple[int, ...] | None:
        """Shape of the part of tensor ``tensor`` held by ``rank`` (None: holds nothing)."""
        box = local_box(self.tensors[tensor].shape, self.layouts[tensor], rank)
        return None if box is None else box_shape(box)


# --------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class Part:
    """The region of one piece held by one rank."""

    src: Box  # region inside the piece (piece coordinates: rows relative to item.start)
    dst: Box  # region inside the rank's local tensor
    shape: tuple[int, ...]  # shape of the region (same for src and dst)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def piece_shape(meta: TensorMeta, item: Item) -> tuple[int, ...]:
    if not meta.shape:
        return ()
    return (item.stop - item.start, *meta.shape[1:])


def piece_bytes(meta: TensorMeta, item: Item) -> int:
    return (item.stop - item.start) * meta.row_bytes if meta.shape else meta.nbytes


def part_of(meta: TensorMeta, layout: Layout, rank: int, item: Item) -> Part | None:
    """Region of piece ``item`` that ``rank`` holds, or None when it holds none of it."""
    box = local_box(meta.shape, layout, rank)
    if box is None:
        return None
    if not meta.shape:
        return Part((), (), ())
    row0, row1 = box[0]
    start, stop = max(item.start, row0), min(item.stop, row1)
    if start >= stop or any(b - a <= 0 for a, b in box[1:]):
        return None
    src = ((start - item.start, stop - item.start), *box[1:])
    dst = ((start - row0, stop - row0), *((0, b - a) for a, b in box[1:]))
    return Part(src, dst, box_shape(src))


def wire_dtype(stored: str, dest: str) -> str:
    """Dtype a piece travels in: the narrower of stored and destination (cast where it saves)."""
    return dest if ITEMSIZE[dest] <= ITEMSIZE[stored] else stored


def aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


@dataclass(frozen=True)
class Segment:
    """One part inside a staging buffer: where it lies and where it goes."""

    item: Item
    part: Part
    dtype: str  # dtype of the bytes in the buffer
    offset: int  # byte offset inside the buffer (ALIGN-aligned)
    nbytes: int


def read_slots(plan: LoadPlan, bucket: Bucket) -> tuple[list[Segment], int]:
    """The reader's layout of a bucket: whole pieces in their stored dtype -> (slots, size)."""
    slots: list[Segment] = []
    cursor = 0
    for item in bucket.items:
        meta = plan.tensors[item.tensor]
        shape = piece_shape(meta, item)
        full = Part(tuple((0, n) for n in shape), (), shape)
        nbytes = piece_bytes(meta, item)
        slots.append(Segment(item, full, meta.dtype, cursor, nbytes))
        cursor = aligned(cursor + nbytes)
    return slots, cursor


def segments_for(plan: LoadPlan, bucket: Bucket, rank: int) -> tuple[list[Segment], int]:
    """What ``rank`` receives from ``bucket`` (its parts, packed, in wire dtypes), and the size.

    The reader packs exactly this layout for each destination, so both sides agree without
    exchanging any metadata. For a broadcast bucket every rank gets the same layout.
    """
    segs: list[Segment] = []
    cursor = 0
    for item in bucket.items:
        meta = plan.tensors[item.tensor]
        part = part_of(meta, plan.layouts[item.tensor], rank, item)
        if part is None:
            continue
        dtype = wire_dtype(meta.dtype, plan.dtypes[item.tensor])
        nbytes = part.numel * ITEMSIZE[dtype]
        segs.append(Segment(item, part, dtype, cursor, nbytes))
        cursor = aligned(cursor + nbytes)
    return segs, cursor


def needers(plan: LoadPlan, item: Item) -> Iterator[int]:
    """Ranks holding some part of ``item``."""
    meta, layout = plan.tensors[item.tensor], plan.layouts[item.tensor]
    ranks = range(plan.world_size) if layout.holders is None else layout.holders
    for rank in ranks:
        if part_of(meta, layout, rank, item) is not None:
            yield rank
