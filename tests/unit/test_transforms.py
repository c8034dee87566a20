"""Key transforms: the view algebra, and plans over transformed views (read once, exact cover)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from distload.checkpoint import CheckpointIndex
from distload.errors import PlacementError
from distload.geometry import segments_for
from distload.placement import TensorParallel, local_box
from distload.plan import LoadPlan
from distload.planner import make_plan, traffic
from distload.transforms import Link, Merge, Rename, Split, Stack, Transpose, apply_transforms
from tests.plans import file_ranges, index_of, simulate
from tests.reference import chunk


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


# --------------------------------------------------------------------------------------------
# Stack: numbered tensors into one with a new leading dim (fused expert parameters)

EXPERTS = 5
FUSED = [
    Stack(r"\.experts\.(\d+)\.gate\.weight$", ".experts.gate"),
    Stack(r"\.experts\.(\d+)\.up\.weight$", ".experts.up"),
    Merge([".experts.gate", ".experts.up"], ".experts.gate_up", dim=1),
    Stack(r"\.experts\.(\d+)\.down\.weight$", ".experts.down"),
]


def _expert_index(extra: list[tuple[tuple[int, ...], str]] = ()) -> tuple[CheckpointIndex, list]:
    """Per-expert gate/up (3 x 4) and down (4 x 3) weights of 5 experts, named as HF writes
    them, plus ``extra`` tensors; returns the index and the renames giving those names."""
    shapes = []
    names = []
    for e in range(EXPERTS):
        for proj, shape in (("gate", (3, 4)), ("up", (3, 4)), ("down", (4, 3))):
            shapes.append((shape, "F32"))
            names.append(f"layer.experts.{e}.{proj}.weight")
    shapes.extend(extra)
    index = index_of(shapes, files=2)
    renames = [Rename(f"^t{i}$", name) for i, name in enumerate(names)]
    return index, renames


def _numbers(index: CheckpointIndex) -> dict[int, torch.Tensor]:
    start = 0
    out = {}
    for i, t in enumerate(index.tensors):
        out[i] = torch.arange(start, start + t.nbytes // 4, dtype=torch.float32).reshape(t.shape)
        start += t.nbytes // 4
    return out


def _received(
    plan: LoadPlan, stored: dict[int, torch.Tensor], rank: int
) -> dict[str, torch.Tensor]:
    """What ``rank`` ends with, built from the plan's segments alone (as the executor copies:
    the part's source region of the read piece into its destination region). Checks first
    that every link's stored and view boxes have the same extents (the view's last dims,
    swapped when transposed; its stacking dims of extent 1)."""
    for _, link in plan.links:
        inner = [b - a for a, b in link.view_box[link.lead :]]
        assert all(b - a == 1 for a, b in link.view_box[: link.lead]), link
        extents = [b - a for a, b in link.stored_box]
        assert (extents[::-1] if link.transposed else extents) == inner, link
    local: dict[int, torch.Tensor] = {}
    for t, out in enumerate(plan.outputs):
        box = local_box(out.shape, plan.layouts[t], rank)
        if box is not None:
            local[t] = torch.full(tuple(b - a for a, b in box), float("nan"))
    for bucket in plan.buckets:
        if bucket.kind == "local" and bucket.reader != rank:
            continue
        for seg in segments_for(plan, bucket, rank)[0]:
            item, part = seg.item, seg.part
            piece = stored[item.tensor][item.start : item.stop]
            region = piece[tuple(slice(a, b) for a, b in part.src)]
            dest = local[part.output][tuple(slice(a, b) for a, b in part.dst)]
            dest.copy_(region.t() if part.transposed else region)
    return {plan.outputs[t].name: v for t, v in local.items()}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("bucket", [24, 10**6])
@pytest.mark.parametrize("dim", [None, 0, 1, 2])
def test_stacked_experts_load_like_torch_stack(world: int, bucket: int, dim: int | None) -> None:
    """Per-expert weights stacked and gate/up concatenated (transformers' fused experts),
    sharded on the expert dim (expert parallel), the output rows, the input columns or not
    at all, with pieces cut inside tensors: every rank's values equal torch.stack / cat /
    chunk of the stored tensors, and every stored byte is read once."""
    index, renames = _expert_index()
    rule = Replicate() if dim is None else Shard(dim)
    plan = make_plan(
        index, world, TensorParallel({"*": rule}), bucket_bytes=bucket, transforms=renames + FUSED
    )
    assert [o.name for o in plan.outputs] == ["layer.experts.gate_up", "layer.experts.down"]
    assert [o.shape for o in plan.outputs] == [(EXPERTS, 6, 4), (EXPERTS, 4, 3)]
    assert set(file_ranges(plan).values()) == {1}
    assert LoadPlan.from_json(plan.to_json()) == plan  # stacked links travel in the plan
    stored = _numbers(index)
    by_name = {t.name: stored[i] for i, t in enumerate(index.tensors)}

    def weight(e: int, proj: str) -> torch.Tensor:
        return by_name[f"t{3 * e + ('gate', 'up', 'down').index(proj)}"]

    full = {
        "layer.experts.gate_up": torch.stack(
            [torch.cat([weight(e, "gate"), weight(e, "up")], dim=0) for e in range(EXPERTS)]
        ),
        "layer.experts.down": torch.stack([weight(e, "down") for e in range(EXPERTS)]),
    }
    for rank in range(world):
        got = _received(plan, stored, rank)
        for name, tensor in full.items():
            want = tensor if dim is None else chunk(tensor, dim, world, rank)
            if want.numel() == 0:
                continue
            assert torch.equal(got[name], want), (rank, name)
    simulate(plan)


def test_stack_of_transposed_views_and_twice_stacked() -> None:
    """Stacking composes with Transpose (the stored tensors' transposes are stacked) and with
    itself (a second leading dim)."""
    index = index_of([((3, 4), "F32")] * 4, files=1)
    names = [Rename(f"^t{i}$", f"b.{i // 2}.e.{i % 2}.w") for i in range(4)]
    transforms = [
        *names,
        Transpose(".w"),
        Stack(r"\.e\.(\d+)\.w$", ".w"),
        Stack(r"^b\.(\d+)\.w$", "blocks"),
    ]
    for world, rule in ((1, Replicate()), (2, Shard(1)), (3, Shard(3)), (2, Shard(0))):
        plan = make_plan(index, world, TensorParallel({"*": rule}), transforms=transforms)
        (out,) = plan.outputs
        assert (out.name, out.shape) == ("blocks", (2, 2, 4, 3))
        stored = _numbers(index)
        ts = [stored[i] for i in range(4)]
        full = torch.stack([torch.stack([ts[2 * b].t(), ts[2 * b + 1].t()]) for b in range(2)])
        for rank in range(world):
            dim = rule.dim if isinstance(rule, Shard) else None
            want = full if dim is None else chunk(full, dim, world, rank)
            if want.numel():
                assert torch.equal(_received(plan, stored, rank)["blocks"], want), (world, rank)


@pytest.mark.parametrize(
    ("transforms", "message"),
    [
        ([Rename("^t1$", "e.3.w"), Rename("^t0$", "e.0.w"), Stack(r"^e\.(\d+)\.w$", "w")],
         r"has numbers up to 3 but lacks \[1, 2\]"),
        ([Rename("^t0$", "e.0.w"), Rename("^t2$", "e.1.w"), Stack(r"^e\.(\d+)\.w$", "w")],
         "cannot stack"),
        ([Rename("^t0$", "e.0.w"), Rename("^t1$", "e.00.w"), Stack(r"^e\.(\d+)\.w$", "w")],
         "are both number 0"),
    ],
)  # fmt: skip
def test_stack_errors(transforms: list, message: str) -> None:
    index = index_of([((3, 4), "F32"), ((3, 4), "F32"), ((4, 4), "F32")], files=1)
    with pytest.raises(PlacementError, match=message):
        apply_transforms(index, transforms)
    with pytest.raises(PlacementError, match="needs a group"):
        Stack(r"experts", "x")


def test_split_of_stacked_views_along_the_stack_and_inside_it() -> None:
    """Splitting a stacked tensor along its stacking dim keeps whole members; splitting it
    along a member dim cuts every member (gate_up back into gate and up)."""
    index, renames = _expert_index()
    transforms = [
        *renames,
        *FUSED,
        Split(".experts.gate_up", [".experts.first", ".experts.rest"], dim=0, sizes=[2, 3]),
        Split(".experts.down", [".experts.down_a", ".experts.down_b"], dim=2, sizes=[1, 2]),
    ]
    plan = make_plan(index, 2, TensorParallel({"*": Shard(1)}), transforms=transforms)
    stored = _numbers(index)
    by_name = {t.name: stored[i] for i, t in enumerate(index.tensors)}
    ts = [by_name[f"t{i}"] for i in range(3 * EXPERTS)]
    gate_up = torch.stack([torch.cat([ts[3 * e], ts[3 * e + 1]]) for e in range(EXPERTS)])
    down = torch.stack([ts[3 * e + 2] for e in range(EXPERTS)])
    full = {
        "layer.experts.first": gate_up[:2],
        "layer.experts.rest": gate_up[2:],
        "layer.experts.down_a": down[:, :, :1],
        "layer.experts.down_b": down[:, :, 1:],
    }
    for rank in range(2):
        got = _received(plan, stored, rank)
        for name, tensor in full.items():
            assert torch.equal(got[name], chunk(tensor, 1, 2, rank)), (rank, name)


def test_stacked_members_sharded_along_their_rows_are_read_locally() -> None:
    """Sharding the stacked tensors on the dim that runs along the stored rows (dim 1) cuts
    each stored expert at the chunk edge, so every rank reads its own rows: no transfer."""
    index, renames = _expert_index()
    plan = make_plan(
        index, 2, TensorParallel({"*": Shard(1)}), bucket_bytes=10**6, transforms=renames + FUSED
    )
    assert {b.kind for b in plan.buckets} == {"local"}
    assert all(s.sent == 0 for s in traffic(plan))
