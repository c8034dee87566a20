"""Key transforms: the view algebra, and plans over transformed views (read once, exact cover)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Shard

from distload.errors import PlacementError
from distload.placement import TensorParallel
from distload.planner import make_plan, traffic
from distload.transforms import Link, Merge, Rename, Split, Transpose, apply_transforms
from tests.unit.test_planner import file_ranges, index_of, simulate


def names_shapes(views: list) -> dict[str, tuple[int, ...]]:
    return {v.name: v.shape for v in views}


def test_rename_with_layer_capture() -> None:
    index = index_of([((4, 2), "BF16")], files=1)
    views = apply_transforms(index, [Rename(r"^t(\d+)$", r"model.layers.\1.w")])
    assert [v.name for v in views] == ["model.layers.0.w"]


def test_split_rows_gqa_sizes() -> None:
    index = index_of([((8, 3), "BF16")], files=1)
    views = apply_transforms(index, [Split("t0", [".q", ".k", ".v"], dim=0, sizes=[4, 2, 2])])
    assert names_shapes(views) == {".q": (4, 3), ".k": (2, 3), ".v": (2, 3)}
    assert views[1].links == (Link(0, ((4, 6), (0, 3)), ((0, 2), (0, 3))),)


def test_transpose_then_split_columns_of_conv1d() -> None:
    # GPT-2 Conv1D c_attn stores (in, 3*out); as Linear weights we want q, k, v of (out, in)
    index = index_of([((4, 6), "F32")], files=1)
    views = apply_transforms(index, [Transpose("t0"), Split("t0", ["q", "k", "v"], dim=0)])
    assert names_shapes(views) == {"q": (2, 4), "k": (2, 4), "v": (2, 4)}
    k = views[1].links[0]
    assert k.transposed and k.stored_box == ((0, 4), (2, 4)) and k.view_box == ((0, 2), (0, 4))


def test_merge_and_split_roundtrip_boxes() -> None:
    index = index_of([((2, 3), "BF16"), ((4, 3), "BF16")], files=1)
    merged = apply_transforms(
        index, [Rename("t0", "a.q"), Rename("t1", "a.k"), Merge([".q", ".k"], ".qk", dim=0)]
    )
    assert names_shapes(merged) == {"a.qk": (6, 3)}
    back = apply_transforms(
        index,
        [
            Rename("t0", "a.q"),
            Rename("t1", "a.k"),
            Merge([".q", ".k"], ".qk"),
            Split(".qk", [".x", ".y"]),
        ],
    )
    assert names_shapes(back) == {"a.x": (3, 3), "a.y": (3, 3)}
    # a.y takes the last row of q's neighbour k only: rows 1..4 of t1
    assert back[1].links == (Link(1, ((1, 4), (0, 3)), ((0, 3), (0, 3))),)


@pytest.mark.parametrize(
    ("transforms", "message"),
    [
        ([Split("t0", ["a", "b", "c"])], "not divisible"),
        ([Split("t0", ["a", "b"], sizes=[1, 2])], "add up to 3"),
        ([Split("t0", ["a", "b"], dim=5)], "no dim 5"),
        ([Transpose("t2")], "only 2-d"),
        ([Merge(["t0", "t9"], "x")], "lacks"),
        ([Rename("t.", "same")], "twice"),
    ],
)
def test_transform_errors(transforms: list, message: str) -> None:
    index = index_of([((4, 2), "BF16"), ((4, 3), "F32"), ((5,), "BF16")], files=1)
    with pytest.raises(PlacementError, match=message):
        apply_transforms(index, transforms)


GPT2_LIKE = [((16, 48), "BF16"), ((48,), "BF16"), ((16, 16), "BF16"), ((12, 16), "BF16")]
GPT2_TRANSFORMS = [
    Rename("^t0$", "attn.c_attn.weight"),
    Rename("^t1$", "attn.c_attn.bias"),
    Transpose(".c_attn.weight"),
    Split(".c_attn.weight", [".q.weight", ".k.weight", ".v.weight"], dim=0),
    Split(".c_attn.bias", [".q.bias", ".k.bias", ".v.bias"], dim=0),
    Rename("^t3$", "qkv.weight"),
    Split("qkv.weight", ["q2", "k2", "v2"], dim=0, sizes=[8, 2, 2]),
]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("bucket", [40, 10**6])
def test_split_then_tp_reads_once_and_covers_exactly(world: int, bucket: int) -> None:
    index = index_of(GPT2_LIKE, files=1)
    tp = TensorParallel(
        {
            "attn.*.weight": "colwise",
            "attn.*.bias": "colwise",
            "q2": Shard(0),
            "k2": Shard(1),
            "t2": "rowwise",
        }
    )
    plan = make_plan(index, world, tp, bucket_bytes=bucket, transforms=GPT2_TRANSFORMS)
    assert set(file_ranges(plan).values()) == {1}
    assert sum(file_ranges(plan).values()) == index.total_bytes
    simulate(plan)
    stats = traffic(plan)
    assert sum(s.sent for s in stats) == sum(s.received for s in stats)


def test_fused_rows_split_colwise_are_local_reads() -> None:
    # a row-fused qkv split into parts sharded colwise: each rank reads its own rows locally
    index = index_of([((24, 8), "BF16")], files=1)
    plan = make_plan(
        index,
        4,
        TensorParallel({"*": "colwise"}),
        bucket_bytes=10**6,
        transforms=[Split("t0", ["q", "k", "v"], dim=0)],
    )
    assert {b.kind for b in plan.buckets} == {"local"}
    assert all(s.sent == 0 for s in traffic(plan))
    assert [s.read for s in traffic(plan)] == [3 * 2 * 8 * 2] * 4


def test_transformed_values_match_torch_reference() -> None:
    """Apply the plan's links to real numbers and compare with torch ops on the full tensor."""
    index = index_of(GPT2_LIKE, files=1)
    plan = make_plan(index, 1, transforms=GPT2_TRANSFORMS)
    stored = {
        i: torch.arange(t.nbytes // 2, dtype=torch.float32).reshape(t.shape)
        for i, t in enumerate(index.tensors)
    }
    got = {}
    for t, out in enumerate(plan.outputs):
        full = torch.empty(out.shape)
        for o, link in plan.links:
            if o != t:
                continue
            region = stored[link.stored][tuple(slice(a, b) for a, b in link.stored_box)]
            full[tuple(slice(a, b) for a, b in link.view_box)] = (
                region.t() if link.transposed else region
            )
        got[out.name] = full
    by_name = {m.name: i for i, m in enumerate(index.tensors)}
    c_attn = stored[by_name["t0"]]
    q, k, v = c_attn.t().chunk(3, dim=0)
    assert torch.equal(got["attn.q.weight"], q) and torch.equal(got["attn.v.weight"], v)
    assert torch.equal(got["attn.k.weight"], k)
    assert torch.equal(got["attn.k.bias"], stored[by_name["t1"]][16:32])
    assert torch.equal(got["k2"], stored[by_name["t3"]][8:10])
