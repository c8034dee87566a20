"""Geometry of pieces: which bytes each rank holds, and the buffer layouts built from that."""

from __future__ import annotations

import itertools
import math

import pytest

from distload.geometry import (
    ALIGN,
    MESSAGE_BYTES,
    Part,
    Segment,
    aligned,
    parts_of,
    piece_bytes,
    piece_offset,
    read_bytes,
    read_slots,
    receiving_classes,
    segments_for,
    slot_offset,
    wire_dtype,
    wire_messages,
)
from distload.placement import TensorParallel
from distload.plan import MIRROR_ALIGN, MIRROR_BYTES, Item
from distload.planner import make_plan
from tests.plans import index_of


def test_pieces_are_rows_of_the_stored_bytes() -> None:
    index = index_of([((10, 4), "F32")], files=1)
    meta = index.tensors[0]
    item = Item(0, 3, 7)
    assert piece_bytes(meta, item) == 4 * 4 * 4
    assert piece_offset(meta, item) == meta.offset + 3 * 16


@pytest.mark.parametrize("world", [2, 3])
def test_column_shards_partition_every_piece(world: int) -> None:
    plan = make_plan(
        index_of([((6, 10), "BF16")], files=1), world, TensorParallel({"t0": "rowwise"})
    )
    for bucket in plan.buckets:
        for item in bucket.items:
            cols = sorted(p.src[1] for r in range(world) for p in parts_of(plan, r, item))
            assert cols[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(cols)), cols


def test_layouts_are_aligned_and_sized_by_their_segments() -> None:
    plan = make_plan(
        index_of([((33, 7), "BF16"), ((9, 5), "F32")]),
        2,
        TensorParallel({"t0": "colwise"}),
        dtype="BF16",
    )
    for number, bucket in enumerate(plan.buckets):
        slots, total = read_slots(plan, bucket)
        assert total == read_bytes(plan, bucket) == aligned(total)
        assert all(s.offset % ALIGN == 0 and s.offset + s.nbytes <= total for s in slots)
        assert all(s.nbytes < MIRROR_BYTES for s in slots)  # small pieces: ALIGN placement
        for members, nbytes in receiving_classes(plan, number):
            segs, size = segments_for(plan, bucket, members[0])
            assert size == nbytes
            assert sum(s.nbytes for s in segs) == sum(
                math.prod(s.part.shape) * (2 if s.dtype == "BF16" else 4) for s in segs
            )


def test_large_pieces_lie_at_their_file_offsets_alignment() -> None:
    """In a read layout a large piece sits at its file offset modulo MIRROR_ALIGN, so an
    O_DIRECT read lands it straight in an aligned buffer; pieces stored back to back stay
    back to back; small ones keep the ALIGN placement; every layout agrees on the sizes."""
    shapes = [
        ((300, 128), "BF16"),  # 76,800 bytes: large
        ((3, 5), "F32"),  # small, stored right after it
        ((200, 256), "F32"),  # large, after the small one
        ((129, 256), "BF16"),  # large, right after the one before
    ]
    plan = make_plan(index_of(shapes, files=1), 1, bucket_bytes=1 << 30)
    (bucket,) = plan.buckets
    slots, total = read_slots(plan, bucket)
    assert total == read_bytes(plan, bucket) == aligned(total)
    by_name = {plan.tensors[s.item.tensor].name: s for s in slots}
    for name, slot in by_name.items():
        meta = plan.tensors[slot.item.tensor]
        if slot.nbytes >= MIRROR_BYTES:
            assert slot.offset % MIRROR_ALIGN == meta.offset % MIRROR_ALIGN, name
        else:
            assert slot.offset % ALIGN == 0, name
        assert slot.offset % meta.itemsize == 0, name
    # stored back to back (t2 then t3): placed back to back
    assert by_name["t3"].offset == by_name["t2"].offset + by_name["t2"].nbytes
    ends = sorted((s.offset, s.offset + s.nbytes) for s in slots)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ends))  # no overlap
    # a piece stored off its item size's alignment keeps the ALIGN placement
    assert slot_offset(10, 4096 * 3 + 2, MIRROR_BYTES, 4) == aligned(10)
    assert slot_offset(10, 4096 * 3 + 8, MIRROR_BYTES, 4) == 8 + 4096
    assert slot_offset(0, 4096 * 3 + 8, MIRROR_BYTES - 1, 4) == 0


def test_pieces_travel_in_the_narrower_dtype() -> None:
    assert wire_dtype("F32", "BF16") == "BF16"
    assert wire_dtype("BF16", "F32") == "BF16"
    assert wire_dtype("I64", "I64") == "I64"


def test_wire_messages_give_each_large_part_a_message_of_its_own() -> None:
    """Parts of MESSAGE_BYTES or more travel alone; the runs of small parts between them
    travel packed, one message each; a layout of small parts only is one message of the
    whole buffer. The messages cover every part once, in order, and no padding between."""

    def seg(offset: int, nbytes: int) -> Segment:
        part = Part(0, ((0, 1),), ((0, 1),), (nbytes,))
        return Segment(Item(0, 0, 1), part, "U8", offset, nbytes)

    small = [seg(0, 100), seg(128, 64)]
    assert [(m.start, m.end, m.alone) for m in wire_messages(small, 192)] == [(0, 192, False)]
    big = MESSAGE_BYTES
    segs = [seg(0, 10), seg(64, big), seg(64 + big, 5), seg(128 + big, 7), seg(192 + big, big)]
    messages = wire_messages(segs, 192 + 2 * big)
    assert [(m.start, m.end, m.alone) for m in messages] == [
        (0, 10, False),
        (64, 64 + big, True),
        (64 + big, 135 + big, False),
        (192 + big, 192 + 2 * big, True),
    ]
    assert [p for m in messages for p in m.parts] == segs
    # one large part after padding: its message is its bytes alone, not the whole buffer
    lone = wire_messages([seg(448, big)], 448 + big)
    assert [(m.start, m.end, m.alone) for m in lone] == [(448, 448 + big, True)]
