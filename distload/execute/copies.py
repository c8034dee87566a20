"""Copies into this rank's destinations: from a read bucket, a received buffer or a peer's slot.

Runs on every rank, on the main thread (and, for :meth:`Copier.direct_targets`, on the
read-ahead thread). Two fast paths keep checkpoints of tens of thousands of small tensors
cheap: pieces that are a whole contiguous host destination are copied as plain memory, and a
bucket of only whole, unchanged tensors (:meth:`Copier.whole_layout`) needs no segment layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distload.dtypes import to_torch
from distload.execute.reader import Read
from distload.geometry import (
    Part,
    Segment,
    aligned,
    piece_bytes,
    piece_offset,
    piece_shape,
    segments_for,
    slot_offset,
)
from distload.plan import Bucket, Item, LoadPlan
from distload.storage import byte_view

# parts up to this size that fill a whole host destination are copied as plain memory: no
# tensor views (the per-piece cost that dominates a checkpoint of tens of thousands of small
# tensors). Larger ones go through torch, whose copies release the GIL that the reader
# thread needs to keep its reads going.
SMALL_COPY_BYTES = 256 * 1024


def region(tensor: torch.Tensor, box: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The sub-tensor ``box`` of ``tensor`` (the whole tensor for an empty box)."""
    return tensor[tuple(slice(a, b) for a, b in box)] if box else tensor


def view(buf: torch.Tensor, seg: Segment) -> torch.Tensor:
    """The segment's bytes in ``buf`` as a tensor of its dtype and shape."""
    raw = buf[seg.offset : seg.offset + seg.nbytes]
    return raw.view(to_torch(seg.dtype)).view(seg.part.shape)


def source(read: Read, seg: Segment) -> torch.Tensor:
    """The region of a read piece that ``seg`` describes, in output orientation."""
    piece = view(read.buffer_of(seg.item), read.slots[seg.item])
    part = region(piece, seg.part.src)
    return part.t() if seg.part.transposed else part


def fills(part: Part, dest: torch.Tensor, dtype: str, nbytes: int) -> bool:
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


@dataclass(frozen=True)
class WholePiece:
    """One piece of a :meth:`Copier.whole_layout`: where it lies, its bytes, its rows."""

    item: Item
    offset: int  # in the bucket's read layout
    nbytes: int
    dest: torch.Tensor  # the destination rows it fills


@dataclass(frozen=True)
class WholeLayout:
    pieces: list[WholePiece]
    size: int  # the layout's size: what every rank receives


class Copier:
    """This rank's destinations and the copies into them, with each bucket's segment layout
    computed once per (bucket number, rank) for the run (the reader thread and the main thread
    both ask; a bucket of thousands of small tensors is then walked once, not three times)."""

    def __init__(self, plan: LoadPlan, rank: int, dests: dict[int, torch.Tensor]) -> None:
        self.plan, self.rank, self.dests = plan, rank, dests
        self._segments: dict[tuple[int, int], tuple[list[Segment], int]] = {}
        # bytes this rank's CPU copied (host destinations and packing; copies into CUDA
        # memory are the copy engine's and count 0)
        self.copied = 0

    def _count(self, nbytes: int, dest: torch.Tensor) -> None:
        if dest.device.type == "cpu":
            self.copied += nbytes

    def segments(self, number: int, rank: int) -> tuple[list[Segment], int]:
        """``segments_for`` bucket ``number`` and ``rank``, cached for this run."""
        key = (number, rank)
        got = self._segments.get(key)
        if got is None:
            got = segments_for(self.plan, self.plan.buckets[number], rank)
            self._segments[key] = got
        return got

    def whole_layout(self, bucket: Bucket, *, everyone: bool) -> WholeLayout | None:
        """For a bucket whose pieces are all rows of stored tensors loaded whole and unchanged
        (:meth:`LoadPlan.whole_output`) into contiguous host destinations of the stored dtype
        -- by every rank (``everyone``: no holders list) or at least by this one -- each
        piece's place in the read layout, its bytes and its destination rows: reading and
        copying then need no segment layout. None for any other bucket."""
        plan, dests, rank = self.plan, self.dests, self.rank
        pieces: list[WholePiece] = []
        cursor = 0
        for item in bucket.items:
            out = plan.whole_output(item.tensor)
            if out is None:
                return None
            holders = plan.layouts[out].holders
            if holders is not None and (everyone or rank not in holders):
                return None
            meta = plan.tensors[item.tensor]
            dest = dests.get(out)
            if (
                dest is None
                or plan.dtypes[out] != meta.dtype
                or dest.device.type != "cpu"
                or dest.dtype != to_torch(meta.dtype)
                or dest.shape != meta.shape
                or not dest.is_contiguous()
            ):
                return None
            nbytes = piece_bytes(meta, item)
            if meta.shape and (item.start or item.stop != meta.shape[0]):
                dest = dest[item.start : item.stop]
            at = slot_offset(cursor, piece_offset(meta, item), nbytes, meta.itemsize)
            pieces.append(WholePiece(item, at, nbytes, dest))  # as read_slots lays it
            cursor = at + nbytes
        return WholeLayout(pieces, aligned(cursor))

    def peers_take(self, number: int, bucket: Bucket, whole: WholeLayout | None = None) -> int:
        """What this rank's peers take of shared bucket ``number`` (its reader's figure of
        bytes sent when each peer copies or reads its own parts: shared memory, the page
        cache); ``whole``: the bucket's :meth:`whole_layout` for everyone, when known."""
        world = self.plan.world_size
        if bucket.kind == "broadcast" and whole is None:
            whole = self.whole_layout(bucket, everyone=True)
        if whole is not None:
            return whole.size * (world - 1)
        sent = 0
        if bucket.kind == "broadcast":
            sent += self.segments(number, self.rank)[1] * (world - 1)
        for members in bucket.classes:
            size = self.segments(number, members[0])[1]
            sent += size * sum(1 for r in members if r != self.rank)
        return sent

    def copy_whole(self, layout: WholeLayout, buf: torch.Tensor) -> None:
        """Copy each piece of a :meth:`whole_layout` out of ``buf`` (plain memory copies)."""
        host = byte_view(buf)
        for piece in layout.pieces:
            byte_view(piece.dest)[:] = host[piece.offset : piece.offset + piece.nbytes]
            self.copied += piece.nbytes

    def direct_targets(self, number: int, bucket: Bucket) -> dict[Item, memoryview]:
        """Destination memory each piece of a local bucket can be read into unchanged (pieces
        whose bytes are one contiguous region of a destination of the stored dtype).

        Runs on the reader thread, once per piece: a checkpoint of tens of thousands of tiny
        tensors spends its time here, so the common case (the piece is the whole destination)
        takes no tensor slicing, and a bucket of only such pieces no segment layout."""
        whole = self.whole_layout(bucket, everyone=False)
        if whole is not None:
            return {p.item: byte_view(p.dest) for p in whole.pieces}
        segs = self.segments(number, self.rank)[0]
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
            rows = region(dest, part.dst)
            if rows.is_contiguous():
                targets[item] = byte_view(rows)
        return targets

    def landing(self, seg: Segment, device: torch.device) -> torch.Tensor | None:
        """The destination memory that ``seg`` fills unchanged -- a contiguous region of a
        destination on ``device`` of the segment's dtype -- as flat bytes (a message received
        there needs no copy), or None."""
        dest = self.dests.get(seg.part.output)
        if dest is None or seg.part.transposed or dest.device != device:
            return None
        try:
            if dest.dtype != to_torch(seg.dtype):
                return None
        except (KeyError, ValueError):
            return None
        target = region(dest, seg.part.dst)
        if not target.is_contiguous() or target.numel() * target.element_size() != seg.nbytes:
            return None
        return target.reshape(-1).view(torch.uint8)

    def stored_run(self, read: Read, seg: Segment, device: torch.device) -> torch.Tensor | None:
        """The bytes of ``seg`` where they lie in ``read``'s buffer, when they are one
        contiguous run there in the segment's dtype on ``device`` (sent as they are, with no
        packing), or None."""
        slot = read.slots.get(seg.item)
        if slot is None or seg.part.transposed or slot.dtype != seg.dtype:
            return None
        part = source(read, seg)
        if part.device != device or not part.is_contiguous():
            return None
        return part.reshape(-1).view(torch.uint8)

    def deliver(self, segs: list[Segment], buf: torch.Tensor) -> None:
        """Copy packed segments of ``buf`` (a received or peer's buffer) into destinations."""
        host = byte_view(buf) if buf.device.type == "cpu" else None
        for seg in segs:
            dest = self.dests.get(seg.part.output)
            if dest is None:
                continue
            if host is not None and fills(seg.part, dest, seg.dtype, seg.nbytes):
                byte_view(dest)[:] = host[seg.offset : seg.offset + seg.nbytes]
                self.copied += seg.nbytes
                continue
            self._into(dest, seg, view(buf, seg))

    def _into(self, dest: torch.Tensor, seg: Segment, part: torch.Tensor) -> None:
        """Copy ``part`` (a tensor view) into its region of ``dest`` and count the bytes."""
        target = region(dest, seg.part.dst)
        target.copy_(part, non_blocking=True)
        self._count(target.numel() * target.element_size(), dest)

    def own_parts(self, number: int, read: Read) -> None:
        """Copy the parts this rank holds of bucket ``number`` straight from ``read``'s slots
        (this rank's own read, or a peer's shared-memory slot)."""
        if read.all_direct:
            return  # every piece was read straight into its destination
        hosts: dict[int, memoryview | None] = {}  # buffer -> its bytes (host buffers)
        for seg in self.segments(number, self.rank)[0]:
            if seg.item in read.direct:
                continue
            dest = self.dests.get(seg.part.output)
            if dest is None:
                continue
            buffer = read.buffer_of(seg.item)
            if id(buffer) not in hosts:
                hosts[id(buffer)] = byte_view(buffer) if buffer.device.type == "cpu" else None
            host = hosts[id(buffer)]
            slot = read.slots[seg.item]
            if (
                host is not None
                and seg.part.shape == slot.part.shape  # the whole piece
                and fills(seg.part, dest, slot.dtype, slot.nbytes)
            ):
                byte_view(dest)[:] = host[slot.offset : slot.offset + slot.nbytes]
                self.copied += slot.nbytes
                continue
            self._into(dest, seg, source(read, seg))

    def pack(self, read: Read, segs: list[Segment], buf: torch.Tensor) -> None:
        """Pack parts of the read pieces into the send layout ``segs`` in ``buf`` (casting)."""
        for seg in segs:
            view(buf, seg).copy_(source(read, seg), non_blocking=True)
            self._count(seg.nbytes, buf)
