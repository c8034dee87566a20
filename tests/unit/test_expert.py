"""Expert parallelism: routed experts recognised by name and spread Megatron-Core style."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

import distload
from distload.checkpoint import TensorMeta
from distload.errors import PlacementError
from distload.placement.base import chunk_range, local_box
from distload.placement.expert import count_experts, find_experts, group_members
from distload.planner import make_plan, traffic
from distload.shapes import MoeShape, model_index

SMALL = MoeShape(hidden=16, layers=4, heads=4, kv_heads=2, head_dim=4, experts=8, expert_ffn=6,
                 vocab=32)  # fmt: skip


def _meta(name: str, shape: tuple[int, ...] = (4, 4)) -> TensorMeta:
    return TensorMeta(name, "f", "BF16", shape, 0, 2 * math.prod(shape))


def test_find_experts_by_name() -> None:
    names = [
        "model.layers.3.mlp.experts.17.down_proj.weight",  # Qwen-MoE, DeepSeek
        "model.layers.0.block_sparse_moe.experts.5.w1.weight",  # Mixtral
        "model.layers.3.mlp.shared_experts.gate_proj.weight",  # DeepSeek shared expert
        "model.layers.3.mlp.gate.weight",  # router
        "model.layers.3.mlp.experts.gate_up_proj",  # fused experts: no index
        "experts.2.w",  # at the start of the name
        "model.myexperts.3.w",  # not a component named experts
    ]
    found = find_experts([_meta(n) for n in names])
    assert found == [
        ("model.layers.3.mlp.experts", 17),
        ("model.layers.0.block_sparse_moe.experts", 5),
        None,
        None,
        None,
        ("experts", 2),
        None,
    ]
    custom = find_experts([_meta("m.moe.e3.w")], r"\.e(\d+)\.")
    assert custom == [("m.moe.e", 3)]  # the set is the name up to the index
    with pytest.raises(PlacementError, match="needs a group"):
        find_experts([_meta("a")], r"experts")


def test_count_experts_checks_the_split() -> None:
    metas = [_meta(f"l.{i}.experts.{e}.w") for i in range(2) for e in range(6)]
    found = find_experts(metas)
    assert count_experts(metas, found, 3) == {"l.0.experts": 6, "l.1.experts": 6}
    with pytest.raises(PlacementError, match=r"'l.0.experts' has 6 experts.*ep=4.*l.0.experts.5.w"):
        count_experts(metas, found, 4)
    assert count_experts(metas, found, 4, num_experts=8) == {"l.0.experts": 8, "l.1.experts": 8}
    with pytest.raises(PlacementError, match=r"expert 5 of 'l\.0\.experts', but num_experts=4"):
        count_experts(metas, found, 2, num_experts=4)


def test_group_members_megatron_order() -> None:
    # 8 ranks, ep=2, expert_tp=2: l -> group (l // 2) % 2; ranks 4..7 replicate 0..3
    assert group_members(list(range(8)), 2, 2) == [(0, 1, 4, 5), (2, 3, 6, 7)]
    assert group_members([10, 11, 12], 3, 1) == [(10,), (11,), (12,)]
    with pytest.raises(PlacementError, match="does not divide the 6 ranks"):
        group_members(list(range(6)), 4, 1)


RULES = distload.preset("qwen3_moe")


def _expected_box(
    meta: TensorMeta, rank: int, *, dp: int, pp: int, tp: int, ep: int, etp: int, stage: int
) -> tuple[tuple[int, int], ...] | None:
    """Independent statement of the expert grid: what ``rank`` holds of an expert tensor."""
    d, p, t = rank // (pp * tp), rank // tp % pp, rank % tp
    if p != stage:
        return None
    local = d * tp + t
    found = find_experts([meta])[0]
    assert found is not None
    expert = found[1]
    if (local // etp) % ep != expert // (SMALL.experts // ep):
        return None
    box = [(0, n) for n in meta.shape]
    if etp > 1:
        rule = distload.TensorParallel(RULES).match(meta.name)
        assert rule is not None
        dim = 0 if rule[1] == "colwise" else len(meta.shape) - 1
        box[dim] = chunk_range(meta.shape[dim], etp, local % etp)
    return tuple(box)


@pytest.mark.parametrize(
    ("dp", "pp", "tp", "ep", "etp"),
    [(1, 1, 4, 4, 1), (2, 1, 2, 2, 2), (2, 2, 2, 2, 1), (4, 1, 2, 2, 2), (1, 2, 4, 2, 2),
     (2, 1, 4, 8, 1), (4, 1, 1, 2, 1)],
)  # fmt: skip
def test_mesh_spreads_experts_like_the_definition(
    dp: int, pp: int, tp: int, ep: int, etp: int
) -> None:
    index = model_index(SMALL)
    world = dp * pp * tp
    mesh = distload.Mesh(dp=dp, pp=pp, tp=tp, ep=ep, expert_tp=etp, tp_rules=RULES)
    layouts = mesh.layouts(index.tensors, world)
    stages = mesh.pipeline.assign(index.tensors)
    dense = distload.Mesh(dp=dp, pp=pp, tp=tp, tp_rules=RULES).layouts(index.tensors, world)
    experts = 0
    for meta, layout, owners, plain in zip(index.tensors, layouts, stages, dense, strict=True):
        if find_experts([meta])[0] is None:
            assert layout == plain, meta.name  # everything else as without ep
            continue
        experts += 1
        (stage,) = owners
        for rank in range(world):
            want = _expected_box(meta, rank, dp=dp, pp=pp, tp=tp, ep=ep, etp=etp, stage=stage)
            assert local_box(meta.shape, layout, rank) == want, (meta.name, rank)
    assert experts == SMALL.layers * SMALL.experts * 3


def test_plan_with_experts_reads_once_and_splits_expert_bytes_evenly() -> None:
    index = model_index(dataclasses.replace(SMALL, expert_ffn=8))  # even chunks at tp 4
    mesh = distload.Mesh(dp=2, tp=4, ep=4, expert_tp=2, tp_rules=RULES)
    plan = make_plan(index, 8, mesh, bucket_bytes=4096)
    read = [0] * 8
    for bucket in plan.buckets:
        for item in bucket.items:
            meta = plan.tensors[item.tensor]
            read[bucket.reader] += (item.stop - item.start) * meta.row_bytes
    assert sum(read) == sum(m.nbytes for m in index.tensors)
    expert_bytes = sum(m.nbytes for m in index.tensors if find_experts([m])[0] is not None)
    held = [t.held for t in traffic(plan)]
    dense_held = traffic(make_plan(index, 8, distload.Mesh(dp=2, tp=4, tp_rules=RULES)))
    # every rank holds one group's experts cut in expert_tp=2: 1/8 of the expert bytes, which
    # with tp=4 over dp=2 were 1/4 each
    for rank in range(8):
        assert held[rank] == dense_held[rank].held - expert_bytes // 4 + expert_bytes // 8


def test_expert_parallel_is_the_mesh_over_the_whole_group() -> None:
    index = model_index(SMALL)
    for ep, etp in itertools.product((None, 2), (1, 2)):
        placement = distload.ExpertParallel(ep, tp_rules=RULES, expert_tp=etp)
        mesh = distload.Mesh(tp=4, ep=ep or 4 // etp, expert_tp=etp, tp_rules=RULES)
        assert placement.layouts(index.tensors, 4) == mesh.layouts(index.tensors, 4)
    plain = distload.ExpertParallel().layouts(index.tensors, 8)
    by = {m.name: lay for m, lay in zip(index.tensors, plain, strict=True)}
    assert by["model.layers.1.mlp.experts.5.up_proj.weight"].holders == (5,)
    assert by["model.layers.1.self_attn.q_proj.weight"].dim is None  # no rules: replicated
    assert "ep=group / expert_tp" in distload.ExpertParallel().describe()


def test_mesh_expert_sizes_are_checked() -> None:
    with pytest.raises(PlacementError, match=r"ep\(4\) \* expert_tp\(2\) = 8 does not divide"):
        distload.Mesh(dp=1, tp=4, ep=4, expert_tp=2)
    with pytest.raises(PlacementError, match="ep must be a positive integer"):
        distload.Mesh(tp=4, ep=0)
    with pytest.raises(PlacementError, match="num_experts must be a positive integer"):
        distload.Mesh(tp=4, ep=2, num_experts=0)
    with pytest.raises(PlacementError, match="has 8 experts, which do not split evenly"):
        distload.Mesh(tp=3, ep=3).layouts(model_index(SMALL).tensors, 3)
    with pytest.raises(PlacementError, match="expert_tp must be a positive integer"):
        distload.ExpertParallel(expert_tp=0)
    assert "experts over ep=2 x expert_tp=1" in distload.Mesh(tp=2, ep=2).describe()


def test_cli_expert_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """--ep with a full mesh builds Mesh(ep=...); --ep/--expert-tp alone spread the experts
    over the whole group; the plan shows them, with the experts read where they are held."""
    import argparse

    from distload.cli import _placement, main

    def parsed(**flags: object) -> argparse.Namespace:
        base: dict[str, object] = dict(
            device_map=None, rule=None, preset="qwen3_moe", tp=None, pp=None, dp=None,
            ep=None, expert_tp=None,
        )  # fmt: skip
        return argparse.Namespace(**{**base, **flags})

    mesh = _placement(parsed(dp=2, tp=4, ep=4, expert_tp=2))
    assert isinstance(mesh, distload.Mesh) and (mesh.ep, mesh.expert_tp) == (4, 2)
    assert _placement(parsed(dp=2, tp=4, expert_tp=2)).ep == 4  # type: ignore[union-attr]
    whole = _placement(parsed(ep=8))
    assert isinstance(whole, distload.ExpertParallel) and whole.ep == 8
    code = main(
        ["plan", "model:qwen3-30b-a3b", "--world", "16", "--ranks-per-node", "8", "--dp", "2",
         "--tp", "8", "--ep", "16", "--preset", "qwen3_moe", "--bucket-mb", "64"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "experts over ep=16 x expert_tp=1" in out
    # every routed expert is held by one rank, which reads it itself: only the attention,
    # embeddings and router move (64 MiB buckets: 880 local, 60 point to point, 1 broadcast)
    assert "(1 broadcast, 880 local, 60 p2p)" in out
