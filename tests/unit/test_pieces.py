"""Cutting stored tensors into pieces and grouping their holders (planner internals)."""

from __future__ import annotations

from distload.pieces import holder_classes, piece_classes, split_pieces
from distload.placement import TensorParallel
from distload.plan import Item
from distload.planner import make_plan
from tests.plans import index_of


def test_pieces_are_bounded_and_cut_at_shard_edges() -> None:
    plan = make_plan(index_of([((10, 8), "F32")], files=1), 3, TensorParallel({"t0": "colwise"}))
    pieces = split_pieces(plan, 0, bucket_bytes=3 * 32)  # 3 rows of 32 bytes per piece
    rows = [(p.start, p.stop) for p in pieces]
    assert rows == [(0, 3), (3, 4), (4, 7), (7, 8), (8, 10)]  # shard edges 4 and 8
    assert split_pieces(plan, 0, bucket_bytes=1 << 20, grid=5) == [Item(0, 0, 5), Item(0, 5, 10)]


def test_replicas_of_one_shard_form_one_class() -> None:
    tp = TensorParallel({"t0": "colwise"}, size=2)  # world 4: two replicas of TP 2
    plan = make_plan(index_of([((8, 4), "F32")], files=1), 4, tp)
    holding = holder_classes(plan, 0)
    assert sorted(map(sorted, holding)) == [[0, 2], [1, 3]]
    assert piece_classes(plan, Item(0, 0, 4), holding) == ((0, 2),)
    assert piece_classes(plan, Item(0, 4, 8), holding) == ((1, 3),)
