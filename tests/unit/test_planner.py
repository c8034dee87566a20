"""The planner with plain integers: read once, balance, bucket bound, coverage, determinism."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Shard

from distload.checkpoint import TensorMeta
from distload.dtypes import ITEMSIZE
from distload.errors import PlacementError
from distload.geometry import piece_bytes, read_bytes, read_slots, segments_for
from distload.placement import Layout, ReplicateAll, TensorParallel, local_box
from distload.plan import Bucket, LoadPlan
from distload.planner import make_plan, traffic
from distload.transforms import Merge, Rename, Split
from tests.plans import file_ranges, index_of, simulate

LLAMAISH = [
    ((64, 16), "BF16"),
    ((16,), "F32"),
    ((16, 16), "BF16"),
    ((8, 16), "BF16"),
    ((16, 16), "BF16"),
    ((43, 16), "BF16"),
    ((16, 43), "BF16"),
    ((), "I64"),
    ((0, 4), "F32"),
    ((3, 5, 7), "BF16"),
    ((5,), "BOOL"),
]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("bucket", [64, 500, 10**6])
@pytest.mark.parametrize("rules", ["replicate", "tp", "tp2"])
def test_plans_read_once_cover_exactly_and_balance(world: int, bucket: int, rules: str) -> None:
    index = index_of(LLAMAISH)
    placement = {
        "replicate": ReplicateAll(),
        "tp": TensorParallel(
            {
                "t0": "colwise",
                "t2": "rowwise",
                "t3": Shard(0),
                "t6": "rowwise",
                "t9": Shard(1),
                "t10": Shard(0),
                "t8": Shard(0),
            }
        ),
        "tp2": TensorParallel({"t0": "colwise", "t9": Shard(2)}, size=2 if world % 2 == 0 else 1),
    }[rules]
    plan = make_plan(index, world, placement, bucket_bytes=bucket)
    # each byte of every (non-empty) tensor is read exactly once
    reads = file_ranges(plan)
    assert set(reads.values()) <= {1}
    assert sum(reads.values()) == index.total_bytes
    # bucket bound (a single row larger than the bucket is the only exception)
    for b in plan.buckets:
        nbytes = sum(piece_bytes(plan.tensors[i.tensor], i) for i in b.items)
        biggest_row = max(plan.tensors[i.tensor].row_bytes for i in b.items)
        assert nbytes <= max(bucket, biggest_row)
    simulate(plan)
    stats = traffic(plan)
    assert sum(s.read for s in stats) == index.total_bytes
    assert sum(s.sent for s in stats) == sum(s.received for s in stats)


def test_replicated_reads_are_balanced() -> None:
    index = index_of([((256, 64), "BF16")] * 16)
    plan = make_plan(index, 4, bucket_bytes=32 * 1024)
    reads = [s.read for s in traffic(plan)]
    assert max(reads) - min(reads) <= 32 * 1024
    assert all(b.kind == "broadcast" for b in plan.buckets)


def test_row_shards_are_read_locally_without_traffic() -> None:
    index = index_of([((64, 16), "BF16"), ((32, 16), "F32")])
    plan = make_plan(index, 4, TensorParallel({"*": "colwise"}), bucket_bytes=10**6)
    assert {b.kind for b in plan.buckets} == {"local"}
    assert all(s.sent == 0 and s.received == 0 for s in traffic(plan))
    assert sorted(b.reader for b in plan.buckets) == [0, 1, 2, 3]


def test_column_shards_go_point_to_point_with_only_own_slice() -> None:
    index = index_of([((8, 64), "BF16")])
    plan = make_plan(index, 4, TensorParallel({"*": "rowwise"}), bucket_bytes=10**6)
    assert [b.kind for b in plan.buckets] == ["p2p"]
    stats = traffic(plan)
    reader = plan.buckets[0].reader
    for s in stats:
        if s.rank != reader:
            assert s.received == 8 * 16 * 2  # its quarter, nothing more


def test_plan_is_deterministic_and_roundtrips() -> None:
    index = index_of(LLAMAISH)
    tp = TensorParallel({"t0": "colwise", "t2": "rowwise"})
    a = make_plan(index, 3, tp, bucket_bytes=300)
    b = make_plan(index, 3, tp, bucket_bytes=300)
    assert a == b
    assert LoadPlan.from_json(a.to_json()) == a
    assert a.to_json() == LoadPlan.from_json(a.to_json()).to_json()


def test_decoded_plan_knows_its_identity_outputs() -> None:
    """A decoded plan takes identity_output's table from the encoding (outputs written as one
    integer, spelled-out links checked): the same answers as a plan that works it out, with a
    renamed tensor (identity under another name), a split one (two links) and a tensor read
    by two outputs (a split part of it merged back whole)."""
    index = index_of(LLAMAISH)
    transforms = [
        Rename("^t2$", "renamed"),
        Split("t4", ["t4a", "t4b"], dim=0),
        Split("t5", ["t5a", "t5b"], dim=1, sizes=[6, 10]),
        Merge(["t5a", "t5b"], "t5", dim=1),
    ]
    plan = make_plan(index, 2, TensorParallel({"t0": "colwise"}), transforms=transforms)
    decoded = LoadPlan.from_json(plan.to_json())
    from distload.plan import tables

    assert tables(decoded)._identity is not None  # set while decoding, not worked out again
    got = [decoded.identity_output(t) for t in range(len(index.tensors))]
    want = [plan.identity_output(t) for t in range(len(index.tensors))]
    assert got == want
    names = {index.tensors[t].name: out for t, out in enumerate(want)}
    assert plan.outputs[names["t2"]].name == "renamed"  # renamed, still the tensor itself
    assert names["t4"] is None and names["t5"] is None and names["t0"] is not None


def test_downcast_travels_narrow_upcast_travels_stored() -> None:
    index = index_of([((4, 4), "F32"), ((4, 4), "BF16"), ((4,), "I32")])
    down = make_plan(index, 2, dtype="BF16")
    by_name = {t.name: d for t, d in zip(down.tensors, down.dtypes, strict=True)}
    assert by_name == {"t0": "BF16", "t1": "BF16", "t2": "I32"}  # ints are never cast
    seg_dtypes = {s.dtype for b in down.buckets for s in segments_for(down, b, 1)[0]}
    assert seg_dtypes == {"BF16", "I32"}
    up = make_plan(index, 2, dtype="F32")
    seg_dtypes = {s.dtype for b in up.buckets for s in segments_for(up, b, 1)[0]}
    assert seg_dtypes == {"F32", "BF16", "I32"}


def test_readers_restriction() -> None:
    index = index_of([((64, 16), "BF16")] * 4)
    plan = make_plan(index, 4, TensorParallel({"*": "colwise"}), readers=[0], bucket_bytes=512)
    assert {b.reader for b in plan.buckets} == {0}
    assert sum(s.read for s in traffic(plan)) == index.total_bytes
    simulate(plan)


def test_names_filter() -> None:
    plan = make_plan(index_of(LLAMAISH), 2, names=["t1", "t3"])
    assert [t.name for t in plan.outputs] == ["t1", "t3"]
    assert set(plan.skipped) == {f"t{i}" for i in range(len(LLAMAISH))} - {"t1", "t3"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 0}, "world_size must be >= 1"),
        ({"world_size": 2, "bucket_bytes": 0}, "bucket_bytes"),
        ({"world_size": 2, "readers": [5]}, "readers"),
        ({"world_size": 2, "dtype": "I32"}, "floating"),
    ],
)
def test_plan_argument_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        make_plan(index_of(LLAMAISH), **kwargs)  # type: ignore[arg-type]


def test_placement_outside_group_refused() -> None:
    class Bad:
        def layouts(self, tensors: list[TensorMeta], world_size: int) -> list[Layout]:
            return [Layout(None, 1, (0, 9))] * len(tensors)

        def describe(self) -> str:
            return "bad"

    with pytest.raises(PlacementError, match="outside the group of 2"):
        make_plan(index_of(LLAMAISH), 2, Bad())


dims = st.integers(min_value=0, max_value=9)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(dims, min_size=0, max_size=3), min_size=1, max_size=6),
    world=st.integers(1, 5),
    bucket=st.integers(1, 400),
    shard=st.lists(st.integers(-1, 2), min_size=6, max_size=6),
)
def test_random_plans_cover_exactly(
    shapes: list[list[int]], world: int, bucket: int, shard: list[int]
) -> None:
    index = index_of([(tuple(s), "BF16") for s in shapes], files=1)
    rules = {}
    for i, s in enumerate(shapes):
        if shard[i] >= 0 and shard[i] < len(s):
            rules[f"t{i}"] = Shard(shard[i])
    plan = make_plan(index, world, TensorParallel(rules), bucket_bytes=bucket)
    reads = file_ranges(plan)
    assert set(reads.values()) <= {1}
    assert all(read_bytes(plan, b) == read_slots(plan, b)[1] for b in plan.buckets)
    simulate(plan)


def test_replicas_form_multicast_classes_rooted_near_the_reader() -> None:
    """dp2 x tp2 over two nodes: the data-parallel replicas of each TP rank hold identical
    parts, so each p2p bucket has one class per TP rank; the class's root is the reader when
    it is a member, else the member on the reader's node."""
    index = index_of([((8, 64), "BF16"), ((16, 32), "F32")])
    nodes = [0, 0, 1, 1]  # a TP group per node; ranks 0 and 2 hold chunk 0, 1 and 3 chunk 1
    plan = make_plan(
        index, 4, TensorParallel({"*": "rowwise"}, size=2), bucket_bytes=10**6, nodes=nodes
    )
    assert {b.kind for b in plan.buckets} == {"p2p"}
    for b in plan.buckets:
        assert sorted(sorted(c) for c in b.classes) == [[0, 2], [1, 3]]
        for c in b.classes:
            if b.reader in c:
                assert c[0] == b.reader
            else:
                assert nodes[c[0]] == nodes[b.reader]
        assert b.multicasts() == b.classes
    assert plan.multicast_groups() == ((0, 2), (1, 3))
    assert LoadPlan.from_json(plan.to_json()) == plan
    # the reader sends each byte it read once (to a root, or within its own class); without
    # multicast it sends its replica's slice plus both slices of the other class
    total = index.total_bytes
    multicast = traffic(plan)
    plain = traffic(plan, multicast=False)
    assert sum(s.sent for s in multicast) == sum(s.received for s in multicast)
    assert sum(s.sent for s in plain) == sum(s.received for s in plain)
    assert [s.received for s in multicast] == [s.received for s in plain]
    assert len(plan.buckets) == 1
    reader = plan.buckets[0].reader
    assert multicast[reader].sent == total
    assert plain[reader].sent == total * 3 // 2


def test_holder_classes_group_replicas_once_per_tensor() -> None:
    from distload.placement import Mesh
    from distload.planner import holder_classes

    index = index_of([((64, 16), "BF16"), ((16,), "F32")], files=1)
    plan = make_plan(index, 128, Mesh(dp=16, tp=8, tp_rules={"t0": "colwise"}), bucket_bytes=10**6)
    sharded = holder_classes(plan, 0)
    assert len(sharded) == 8 and all(len(g) == 16 for g in sharded)
    assert sorted(r for g in sharded for r in g) == list(range(128))
    assert all({r % 8 for r in g} == {g[0] % 8} for g in sharded)  # one TP rank each
    assert holder_classes(plan, 1) == [list(range(128))]  # replicated: one class
    simulate(make_plan(index, 8, Mesh(dp=2, tp=4, tp_rules={"t0": "colwise"}), bucket_bytes=64))


def test_buckets_of_disjoint_stages_are_interleaved_and_read_inside_their_stage() -> None:
    """pp2 x tp2 on 4 ranks: stage 0 (ranks 0, 1) and stage 1 (ranks 2, 3) each get their
    p2p buckets read by one of their own ranks, and the global order alternates between the
    stages (each keeps its file order), so their transfers overlap; a plan whose shared
    buckets all reach every rank (TP over the whole group) keeps the file order."""
    from distload.placement import Mesh, preset
    from distload.planner import interleave
    from distload.shapes import ModelShape, model_index

    shape = ModelShape(hidden=256, intermediate=704, layers=4, heads=8, kv_heads=4, vocab=1000)
    index = model_index(shape, shard_bytes=2**21)
    plan = make_plan(index, 4, Mesh(pp=2, tp=2, tp_rules=preset("llama")), bucket_bytes=2**16)
    shared = [b for b in plan.buckets if b.kind == "p2p"]
    stages = [frozenset(r for c in b.classes for r in c) for b in shared]
    assert set(stages) == {frozenset({0, 1}), frozenset({2, 3})}
    for b, stage in zip(shared, stages, strict=True):
        assert b.reader in stage
    switches = sum(1 for a, b in itertools.pairwise(stages) if a != b)
    assert switches >= len(shared) // 2  # alternating, not one stage after the other
    # interleaving keeps each group's own order: any order in, the same per-stage order out
    reversed_in = list(reversed(plan.buckets))
    out = interleave(reversed_in, 4)
    assert sorted(map(id, out)) == sorted(map(id, reversed_in))
    for stage in set(stages):

        def of(seq: Sequence[Bucket], stage: frozenset[int] = stage) -> list[Bucket]:
            return [b for b in seq if frozenset(r for c in b.classes for r in c) == stage]

        assert of(out) == of(reversed_in)
    tp = make_plan(index, 4, TensorParallel(preset("llama")), bucket_bytes=2**16)
    assert interleave(list(tp.buckets), 4) == tp.buckets


def test_check_interval_travels_with_the_plan() -> None:
    """Every rank must place its status checks before the same buckets: the interval is part
    of the plan rank 0 builds (``DISTLOAD_CHECK_EVERY`` is read there only)."""
    import dataclasses

    from distload.plan import CHECK_EVERY

    index = index_of([((64, 8), "F32")])
    plan = make_plan(index, 2, TensorParallel({"*": "rowwise"}), bucket_bytes=256)
    assert plan.check_every == CHECK_EVERY
    again = LoadPlan.from_json(dataclasses.replace(plan, check_every=7).to_json())
    assert again.check_every == 7


class _Fixed:
    """A placement returning the given layouts in order (cycled), for edge cases no built-in
    placement produces (fewer holders than chunks, holders out of order)."""

    def __init__(self, layouts: Sequence[Layout]) -> None:
        self.given = list(layouts)

    def layouts(self, tensors: Sequence[TensorMeta], world_size: int) -> list[Layout]:
        out = []
        for i, meta in enumerate(tensors):
            layout = self.given[i % len(self.given)]
            if layout.dim is not None and layout.dim >= len(meta.shape):  # not shardable so
                layout = Layout(None, 1, layout.holders)
            out.append(layout)
        return out

    def describe(self) -> str:
        return "fixed"


def _held_by_rank(plan: LoadPlan) -> list[int]:
    """Bytes every rank holds, one local box per output and rank (the definition)."""
    held = [0] * plan.world_size
    for out in range(len(plan.outputs)):
        for rank in range(plan.world_size):
            shape = plan.local_shape(out, rank)
            if shape is not None:
                held[rank] += math.prod(shape) * ITEMSIZE[plan.dtypes[out]]
    return held


@pytest.mark.parametrize(
    "world,placement",
    [
        (4, None),
        (4, TensorParallel({"t0": "colwise", "t2": "rowwise", "t9": "colwise"})),
        (8, "mesh"),
        (
            6,
            _Fixed(
                [
                    Layout(0, 4, (5, 1)),  # fewer holders than chunks: chunks 2, 3 unheld
                    Layout(None, 1, (3, 0)),
                    Layout(1, 3),
                    Layout(0, 2, (4, 2, 0, 1, 3)),  # three replicas of chunk 0, two of 1
                ]
            ),
        ),
    ],
)
def test_traffic_held_is_each_rank_local_boxes(world: int, placement: object) -> None:
    """The held bytes per rank (summed per layout and chunk, then spread over the ranks)
    equal the sum of every rank's local box of every output, in the destination dtype."""
    from distload.placement import Mesh

    if placement == "mesh":
        placement = Mesh(dp=2, pp=2, tp=2, tp_rules={"t0": "colwise", "t2": "rowwise"})
    plan = make_plan(index_of(LLAMAISH), world, placement, dtype="F32", bucket_bytes=256)  # type: ignore[arg-type]
    assert [s.held for s in traffic(plan)] == _held_by_rank(plan)


def test_holder_classes_are_computed_once_per_combination_of_layouts() -> None:
    """The cache is keyed by the layouts of a stored tensor's outputs: tensors laid out alike
    share one entry, and the cached answer is the uncached one."""
    from distload.placement import Mesh
    from distload.planner import holder_classes

    shapes = [((16, 8), "BF16")] * 6 + [((8,), "F32")] * 6
    index = index_of(shapes, files=1)
    rules = {f"t{i}": "colwise" for i in range(6)}
    plan = make_plan(index, 16, Mesh(dp=4, tp=4, tp_rules=rules), bucket_bytes=10**6)
    cache: dict[tuple[Layout, ...], list[list[int]]] = {}
    for t in range(len(plan.tensors)):
        assert holder_classes(plan, t, cache) == holder_classes(plan, t)
    assert len(cache) == 2  # colwise over tp 4 x dp 4, and replicated


def test_plan_json_abbreviates_untransformed_tensors_and_roundtrips_transformed_ones() -> None:
    """Outputs that are stored tensors as they are travel as one integer; renamed, split,
    merged and transposed ones in full; every plan decodes to itself, links in order."""
    import json

    from distload.transforms import Merge, Rename, Split, Transpose

    shapes = [((8, 4), "BF16"), ((8, 4), "BF16"), ((6, 4), "F32"), ((4, 6), "F32"), ((3,), "I64")]
    index = index_of(shapes, files=1)  # t0..t4
    transforms = [
        Merge(["t0", "t1"], "m01", dim=0),  # two links into one output
        Split("t2", ["s_a", "s_b"], dim=0, sizes=[2, 4]),
        Transpose("t3"),
        Rename("^t4$", "renamed"),
    ]
    plain = make_plan(index, 2, bucket_bytes=64)
    raw = json.loads(plain.to_json())
    assert raw["outputs"] == [0, 1, 2, 3, 4] and raw["links"] == []
    assert len(raw["layout_table"]) == 1
    mixed = make_plan(
        index,
        4,
        TensorParallel({"m01": "colwise", "s_b": "rowwise"}),
        transforms=transforms,
        bucket_bytes=64,
    )
    raw = json.loads(mixed.to_json())
    assert not any(isinstance(o, int) for o in raw["outputs"])  # nothing is a plain copy
    for plan in (plain, mixed):
        again = LoadPlan.from_json(plan.to_json())
        assert again == plan and again.links == plan.links
        assert again.to_json() == plan.to_json()


def _parts_by_definition(plan: LoadPlan, rank: int, item: object) -> list[tuple[object, ...]]:
    """A rank's part of a piece of an untransformed tensor, from the boxes alone: its local
    box cut to the piece's rows -> (src, dst, shape)."""
    meta = plan.tensors[item.tensor]  # type: ignore[attr-defined]
    box = local_box(meta.shape, plan.layouts[item.tensor], rank)  # type: ignore[attr-defined]
    if box is None:
        return []
    if not meta.shape:
        return [((), (), ())]
    lo = max(box[0][0], item.start)  # type: ignore[attr-defined]
    hi = min(box[0][1], item.stop)  # type: ignore[attr-defined]
    if lo >= hi or any(a >= b for a, b in box[1:]):
        return []
    src = ((lo - item.start, hi - item.start), *box[1:])  # type: ignore[attr-defined]
    dst = ((lo - box[0][0], hi - box[0][0]), *((0, b - a) for a, b in box[1:]))
    return [(src, dst, (hi - lo, *(b - a for a, b in box[1:])))]


@settings(max_examples=80, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 9), min_size=0, max_size=3), min_size=1, max_size=5),
    world=st.integers(1, 6),
    picks=st.lists(
        st.tuples(
            st.integers(-1, 2), st.integers(1, 7), st.permutations(range(6)), st.integers(1, 6)
        ),
        min_size=5,
        max_size=5,
    ),
    bucket=st.integers(1, 300),
)
def test_untransformed_geometry_matches_the_boxes(
    shapes: list[list[int]],
    world: int,
    picks: list[tuple[int, int, list[int], int]],
    bucket: int,
) -> None:
    """Tensors loaded as stored take shortcuts (no box arithmetic) in the planner's receiver
    classes and in every rank's parts: both agree with the definition from the boxes, under
    random layouts (any dim, more chunks than rows, holder subsets in any order, replicas)."""
    index = index_of([(tuple(s), "BF16") for s in shapes], files=1)
    layouts = []
    for shape, (dim, chunks, order, count) in zip(shapes, picks, strict=False):
        held = tuple(r for r in order if r < world)[:count]
        layouts.append(Layout(dim if 0 <= dim < len(shape) else None, chunks, held))
    plan = make_plan(index, world, _Fixed(layouts), bucket_bytes=bucket)
    assert all(plan.identity_output(t) == t for t in range(len(plan.tensors)))
    for b in plan.buckets:
        for rank in range(world):
            got = [(s.part.src, s.part.dst, s.part.shape) for s in segments_for(plan, b, rank)[0]]
            want = [p for item in b.items for p in _parts_by_definition(plan, rank, item)]
            assert got == want
        if b.kind == "p2p":
            by_parts: dict[tuple[object, ...], list[int]] = {}
            for rank in range(world):
                key = tuple(tuple(_parts_by_definition(plan, rank, i)) for i in b.items)
                if any(key):
                    by_parts.setdefault(key, []).append(rank)
            assert sorted(sorted(c) for c in b.classes) == sorted(by_parts.values())
