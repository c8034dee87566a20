"""Geometry of pieces: which bytes each rank holds, and the buffer layouts built from that."""

from __future__ import annotations

import itertools
import math

import pytest

from distload.geometry import (
    ALIGN,
    aligned,
    parts_of,
    piece_bytes,
    piece_offset,
    read_bytes,
    read_slots,
    receiving_classes,
    segments_for,
    wire_dtype,
)
from distload.placement import TensorParallel
from distload.plan import Item
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
        for members, nbytes in receiving_classes(plan, number):
            segs, size = segments_for(plan, bucket, members[0])
            assert size == nbytes
            assert sum(s.nbytes for s in segs) == sum(
                math.prod(s.part.shape) * (2 if s.dtype == "BF16" else 4) for s in segs
            )


def test_pieces_travel_in_the_narrower_dtype() -> None:
    assert wire_dtype("F32", "BF16") == "BF16"
    assert wire_dtype("BF16", "F32") == "BF16"
    assert wire_dtype("I64", "I64") == "I64"
