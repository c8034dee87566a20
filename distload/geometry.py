"""Plan geometry: which bytes of each piece every rank holds, and the buffer layouts of a bucket.

Pure functions of a :class:`~distload.plan.LoadPlan` (no torch, no process group): the reader
of a bucket and every receiver derive from the same plan exactly which regions it reads, packs,
sends and receives, so nothing but bytes crosses the wire. Used by the planner (receiver
classes, accounting), the executor and the simulator.

* :func:`parts_of`: the regions of one piece that one rank holds (:class:`Part`);
* :func:`read_slots` / :func:`read_bytes`: the reader's staging layout of a bucket (whole
  pieces, stored dtype; large pieces at their file offset's residue, :func:`slot_offset`);
* :func:`segments_for`: what one rank receives from a bucket, packed, in wire dtypes;
* :func:`wire_messages`: the point-to-point messages that carry it (large parts alone);
* :func:`receiving_classes`: who receives how many bytes of a shared bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distload.dtypes import ITEMSIZE
from distload.index import TensorMeta
from distload.placement.base import Box, box_shape, local_box
from distload.plan import ALIGN, MIRROR_ALIGN, MIRROR_BYTES, Bucket, Item, LoadPlan, tables
from distload.transforms import Link


@dataclass(frozen=True)
class Part:
    """A region of one piece that one rank holds, and where it goes."""

    output: int  # output tensor it fills
    src: Box  # region inside the piece (stored orientation, rows relative to item.start)
    dst: Box  # region inside the rank's local output tensor
    shape: tuple[int, ...]  # shape of the region in output orientation
    transposed: bool = False  # dst = src transposed

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def piece_shape(meta: TensorMeta, item: Item) -> tuple[int, ...]:
    if not meta.shape:
        return ()
    return (item.stop - item.start, *meta.shape[1:])


def piece_bytes(meta: TensorMeta, item: Item) -> int:
    return (item.stop - item.start) * meta.row_bytes if meta.shape else meta.nbytes


def piece_offset(meta: TensorMeta, item: Item) -> int:
    """Absolute file offset of a piece's first byte."""
    return meta.offset + item.start * meta.row_bytes


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return None if any(lo >= hi for lo, hi in out) else out


def _to_stored(link: Link, view: Box) -> Box:
    """Stored region of a view region inside ``link`` (stacking dims dropped)."""
    lead = link.lead
    rel = [(a - o, b - o) for (a, b), (o, _) in zip(view[lead:], link.view_box[lead:], strict=True)]
    if link.transposed:
        rel = [rel[1], rel[0]]
    return tuple((a + o, b + o) for (a, b), (o, _) in zip(rel, link.stored_box, strict=True))


def _to_view(link: Link, stored: Box) -> Box:
    """View region of a stored region inside ``link`` (with its stacking dims)."""
    lead = link.lead
    rel = [(a - o, b - o) for (a, b), (o, _) in zip(stored, link.stored_box, strict=True)]
    if link.transposed:
        rel = [rel[1], rel[0]]
    inner = zip(rel, link.view_box[lead:], strict=True)
    return (*link.view_box[:lead], *((a + o, b + o) for (a, b), (o, _) in inner))


def parts_of(plan: LoadPlan, rank: int, item: Item) -> list[Part]:
    """Regions of piece ``item`` that ``rank`` holds (one per output region it fills)."""
    meta = plan.tensors[item.tensor]
    whole = plan.whole_output(item.tensor)
    if whole is not None:
        # the stored tensor is the output, whole, in full copies (replicated, untransformed):
        # a holder's part is the whole piece at the piece's rows (the common case, made cheap)
        held = plan.layouts[whole].holders
        if held is not None and rank not in held:
            return []
        if not meta.shape:
            return [Part(whole, (), (), ())]
        rest = tuple((0, n) for n in meta.shape[1:])
        rows = item.stop - item.start
        return [
            Part(
                whole, ((0, rows), *rest), ((item.start, item.stop), *rest), (rows, *meta.shape[1:])
            )
        ]
    same = plan.identity_output(item.tensor)
    if same is not None and meta.shape:
        # the stored tensor is the output (sharded): stored and view coordinates agree, so
        # the part is the rank's box cut to the piece's rows
        box = local_box(meta.shape, plan.layouts[same], rank)
        if box is None:
            return []
        (lo, hi), rest = box[0], box[1:]
        lo, hi = max(lo, item.start), min(hi, item.stop)
        if lo >= hi or any(a >= b for a, b in rest):
            return []
        dst = ((lo - box[0][0], hi - box[0][0]), *((0, b - a) for a, b in rest))
        shape = (hi - lo, *(b - a for a, b in rest))
        return [Part(same, ((lo - item.start, hi - item.start), *rest), dst, shape)]
    parts = []
    for out, link in plan.links_of(item.tensor):
        box = local_box(plan.outputs[out].shape, plan.layouts[out], rank)
        if box is None:
            continue
        if not meta.shape:
            parts.append(Part(out, (), (), ()))
            continue
        view = _intersect(box, link.view_box)
        if view is None:
            continue
        piece_box = ((item.start, item.stop), *((0, n) for n in meta.shape[1:]))
        stored = _intersect(_to_stored(link, view), piece_box)
        if stored is None:
            continue
        view = _to_view(link, stored)
        src = ((stored[0][0] - item.start, stored[0][1] - item.start), *stored[1:])
        dst = tuple((a - o, b - o) for (a, b), (o, _) in zip(view, box, strict=True))
        parts.append(Part(out, src, dst, box_shape(view), link.transposed))
    return parts


def wire_dtype(stored: str, dest: str) -> str:
    """Dtype a piece travels in: the narrower of stored and destination (cast where it saves)."""
    return dest if ITEMSIZE[dest] <= ITEMSIZE[stored] else stored


def aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def slot_offset(cursor: int, file_offset: int, nbytes: int, itemsize: int) -> int:
    """Where a piece of ``nbytes`` stored at ``file_offset`` goes in a read layout filled up to
    ``cursor``: a large piece at the first offset from the cursor whose residue modulo
    ``MIRROR_ALIGN`` is its file offset's (an O_DIRECT read lands it there straight), so one
    stored right after the piece before it follows it without a gap; any other piece (small,
    or stored off its item size's alignment, where a typed view could not be made) at the
    next ``ALIGN`` boundary."""
    if nbytes >= MIRROR_BYTES and file_offset % itemsize == 0:
        return cursor + (file_offset - cursor) % MIRROR_ALIGN
    return aligned(cursor)


@dataclass(frozen=True)
class Segment:
    """One part inside a staging buffer: where it lies and where it goes."""

    item: Item
    part: Part
    dtype: str  # dtype of the bytes in the buffer
    offset: int  # byte offset inside the buffer (ALIGN-aligned, or see slot_offset)
    nbytes: int


def read_slots(plan: LoadPlan, bucket: Bucket) -> tuple[list[Segment], int]:
    """The reader's layout of a bucket: whole pieces in their stored dtype -> (slots, size)."""
    slots: list[Segment] = []
    cursor = 0
    for item in bucket.items:
        meta = plan.tensors[item.tensor]
        shape = piece_shape(meta, item)
        full = Part(-1, tuple((0, n) for n in shape), (), shape)
        nbytes = piece_bytes(meta, item)
        at = slot_offset(cursor, piece_offset(meta, item), nbytes, meta.itemsize)
        slots.append(Segment(item, full, meta.dtype, at, nbytes))
        cursor = at + nbytes
    return slots, aligned(cursor)


def read_bytes(plan: LoadPlan, bucket: Bucket) -> int:
    """Size of a bucket's read layout (:func:`read_slots`'s second value, without building
    the slots: what sizing staging buffers needs)."""
    cursor = 0
    tensors = plan.tensors
    for item in bucket.items:
        meta = tensors[item.tensor]
        nbytes = piece_bytes(meta, item)
        cursor = slot_offset(cursor, piece_offset(meta, item), nbytes, meta.itemsize) + nbytes
    return aligned(cursor)


def segments_for(plan: LoadPlan, bucket: Bucket, rank: int) -> tuple[list[Segment], int]:
    """What ``rank`` receives from ``bucket`` (its parts, packed, in wire dtypes), and the size.

    The reader packs exactly this layout for each destination, so both sides agree without
    exchanging any metadata. For a broadcast bucket every rank gets the same layout, where a
    part that is a whole piece, unchanged, lies where :func:`read_slots` puts it
    (:func:`slot_offset`): a bucket of such pieces is sent as it was read. Other parts are
    packed ``ALIGN``-aligned.
    """
    segs: list[Segment] = []
    if bucket.kind == "local" and rank != bucket.reader:
        return segs, 0  # only its reader holds any of it
    if bucket.kind == "p2p" and not any(rank in c for c in bucket.classes):
        return segs, 0  # the classes are every rank holding a part of its pieces
    cursor = 0
    tensors, dtypes = plan.tensors, plan.dtypes
    for item in bucket.items:
        meta = tensors[item.tensor]
        stored = meta.dtype
        for part in parts_of(plan, rank, item):
            dtype = wire_dtype(stored, dtypes[part.output])
            nbytes = math.prod(part.shape) * ITEMSIZE[dtype]
            if (
                bucket.kind == "broadcast"  # sent as read when every part is a whole piece
                and dtype == stored
                and not part.transposed
                and part.shape == piece_shape(meta, item)
            ):
                at = slot_offset(cursor, piece_offset(meta, item), nbytes, meta.itemsize)
            else:
                at = aligned(cursor)
            segs.append(Segment(item, part, dtype, at, nbytes))
            cursor = at + nbytes
    return segs, aligned(cursor)


# a part of at least this many bytes travels point to point as a message of its own, so that
# its receiver can take it straight into its destination (no receive buffer, no copy)
MESSAGE_BYTES = 1 << 20


@dataclass(frozen=True)
class Message:
    """One point-to-point message of a receiver's packed layout: bytes ``[start, end)`` of
    it, holding ``parts``; ``alone``: it is one large part (which its receiver may take
    straight into its destination)."""

    start: int
    end: int
    parts: tuple[Segment, ...]
    alone: bool = False


def wire_messages(segs: list[Segment], size: int) -> list[Message]:
    """The messages that carry one receiver's packed layout (``segs``, ``size``: its
    :func:`segments_for`), the same on both sides since both derive them from the plan.

    A layout without a part of :data:`MESSAGE_BYTES` or more is one message, the whole
    buffer. Otherwise each such part is a message of its own, and each run of smaller parts
    between them one more (the padding between messages never travels)."""
    if not any(s.nbytes >= MESSAGE_BYTES for s in segs):
        return [Message(0, size, tuple(segs))]
    messages: list[Message] = []
    run: list[Segment] = []
    for seg in [*segs, None]:
        if seg is not None and seg.nbytes < MESSAGE_BYTES:
            run.append(seg)
            continue
        if run:
            messages.append(Message(run[0].offset, run[-1].offset + run[-1].nbytes, tuple(run)))
            run = []
        if seg is not None:
            messages.append(Message(seg.offset, seg.offset + seg.nbytes, (seg,), alone=True))
    return messages


def receiving_classes(plan: LoadPlan, number: int) -> list[tuple[tuple[int, ...], int]]:
    """Who receives what from shared bucket ``number`` of ``plan``: (class, bytes each member
    receives), root first.

    A broadcast is one class of every rank rooted at the reader; a p2p bucket has its own
    classes. Sizes come from one ``segments_for`` per class (members receive identical bytes),
    worked out once per bucket of a plan object (the list is shared: do not change it).
    """
    bucket = plan.buckets[number]
    if bucket.kind == "local":
        return []
    memo = tables(plan).receiving
    known = memo.get(number)
    if known is not None:
        return known
    if bucket.kind == "broadcast":
        everyone = (bucket.reader, *(r for r in range(plan.world_size) if r != bucket.reader))
        found = [(everyone, segments_for(plan, bucket, bucket.reader)[1])]
    else:
        found = [(c, segments_for(plan, bucket, c[0])[1]) for c in bucket.classes]
    memo[number] = found
    return found
