"""The plan's data: its JSON form, status checks, and the tables derived beside it."""

from __future__ import annotations

import dataclasses
import gc

from distload.placement import TensorParallel
from distload.plan import LoadPlan, tables
from distload.planner import make_plan
from tests.plans import index_of

SHAPES = [((64, 16), "BF16"), ((16,), "F32"), ((16, 43), "BF16"), ((), "I64"), ((0, 4), "F32")]


def test_json_roundtrip_keeps_every_field() -> None:
    plan = make_plan(
        index_of(SHAPES),
        3,
        TensorParallel({"t0": "colwise", "t2": "rowwise"}),
        bucket_bytes=256,
        nodes=[0, 0, 1],
        token="abc",
        check_every=3,
        multicast=False,
    )
    again = LoadPlan.from_json(plan.to_json())
    assert again == plan
    for f in dataclasses.fields(LoadPlan):
        assert getattr(again, f.name) == getattr(plan, f.name), f.name
    assert (again.token, again.check_every, again.multicast) == ("abc", 3, False)


def test_status_checks_every_nth_shared_bucket_and_every_broadcast() -> None:
    plan = make_plan(index_of([((8, 8), "F32")] * 12), 2, bucket_bytes=256, check_every=4)
    shared = [n for n, b in enumerate(plan.buckets) if b.kind != "local"]
    assert len(shared) == 12 and all(plan.buckets[n].kind == "broadcast" for n in shared)
    assert plan.status_checks(shm=True) == frozenset(shared[3::4])
    assert plan.status_checks(shm=False) == frozenset(shared)  # before every broadcast
    # broadcast buckets read from the page cache by every rank move nothing over the
    # transport: only the periodic checks remain before them
    cached = frozenset(shared[:6])
    want = frozenset(shared[3:6:4]) | frozenset(shared[6:])
    assert plan.status_checks(shm=False, cached=cached) == want


def test_multicast_groups_skip_buckets_read_from_the_page_cache() -> None:
    plan = make_plan(
        index_of([((8, 8), "F32")] * 4),
        4,
        TensorParallel({"t*": "colwise"}, size=2),
        bucket_bytes=256,
    )
    groups = plan.multicast_groups()
    assert groups == ((0, 2), (1, 3))
    shared = frozenset(n for n, b in enumerate(plan.buckets) if b.kind != "local")
    assert plan.multicast_groups(skip=shared) == ()


def test_identity_outputs_are_derived_beside_the_plan_and_dropped_with_it() -> None:
    plan = make_plan(index_of(SHAPES), 2)
    assert [plan.identity_output(t) for t in range(len(SHAPES))] == list(range(len(SHAPES)))
    assert "_identity" not in plan.__dict__ and tables(plan)._identity is not None
    before = len(tables)
    del plan
    gc.collect()
    assert len(tables) < before


def test_local_shape_of_a_sharded_and_a_replicated_output() -> None:
    plan = make_plan(index_of(SHAPES), 4, TensorParallel({"t0": "colwise", "t2": "rowwise"}))
    out = {o.name: i for i, o in enumerate(plan.outputs)}
    assert [plan.local_shape(out["t0"], r) for r in range(4)] == [(16, 16)] * 4
    assert [plan.local_shape(out["t2"], r) for r in range(4)] == [(16, 11)] * 3 + [(16, 10)]
    assert plan.local_shape(out["t1"], 3) == (16,)
