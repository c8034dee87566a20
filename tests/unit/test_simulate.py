"""The bandwidth model (``distload plan --simulate``) with plain integers: conservation of
bytes, the lower bound, storage- and network-bound regimes, real model shapes."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

import distload
from distload.cli import main
from distload.placement import preset
from distload.planner import make_plan, traffic
from distload.shapes import MODELS, ModelShape, MoeShape, model_index
from distload.simulate import Bandwidths, simulate

GB = 1e9
SMALL = ModelShape(hidden=256, intermediate=704, layers=4, heads=8, kv_heads=4, vocab=1000)


def _params(shape: ModelShape) -> int:
    h, i, kv = shape.hidden, shape.intermediate, shape.hidden // shape.heads * shape.kv_heads
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * i + 2 * h
    return 2 * shape.vocab * h + shape.layers * per_layer + h


@pytest.mark.parametrize("name", ["llama-8b", "llama-70b", "llama-405b"])
def test_model_index_has_the_real_parameter_count(name: str) -> None:
    shape = MODELS[name]
    assert isinstance(shape, ModelShape)
    index = model_index(shape, shard_bytes=5 * 2**30)
    assert index.total_bytes == 2 * _params(shape)
    billions = {"llama-8b": 8.0, "llama-70b": 70.6, "llama-405b": 405.8}[name]
    assert index.total_bytes / 2 / 1e9 == pytest.approx(billions, rel=0.01)
    assert all(f.size <= 5 * 2**30 + 8 + 128 * 1000 for f in index.files)
    # offsets are contiguous within each file, as save_pretrained writes them
    for f in index.files:
        ts = [t for t in index.tensors if t.file == f.name]
        for a, b in itertools.pairwise(ts):
            assert a.offset + a.nbytes == b.offset


def _plan(world: int, per_node: int, placement: object, bucket: int = 2**20):  # type: ignore[no-untyped-def]
    index = model_index(SMALL, shard_bytes=2**21)
    return make_plan(
        index,
        world,
        placement,  # type: ignore[arg-type]
        bucket_bytes=bucket,
        nodes=[r // per_node for r in range(world)],
    )


def test_single_reader_node_is_storage_bound() -> None:
    plan = _plan(4, 4, distload.TensorParallel(preset("llama")))
    bw = Bandwidths(node_storage=1 * GB, nic=1e6, intra=1e6 * GB, latency=0.0)
    pred = simulate(plan, bw)
    total = plan.index.total_bytes
    assert pred.read_bytes_per_node == [total]
    assert pred.nic_bytes_out == [0] and pred.nic_bytes_in == [0]  # one node: no network
    assert pred.lower_bound == pytest.approx(total / GB)
    assert pred.seconds == pytest.approx(pred.lower_bound, rel=0.02)
    assert pred.bottleneck == "storage"


@pytest.mark.parametrize("placement", ["tp", "replicate", "mesh"])
def test_bytes_are_conserved_and_bound_holds(placement: str) -> None:
    world, per_node = 8, 4
    layout = {
        "tp": distload.TensorParallel(preset("llama")),
        "replicate": None,
        "mesh": distload.Mesh(dp=2, tp=4, tp_rules=preset("llama")),
    }[placement]
    plan = _plan(world, per_node, layout)
    pred = simulate(plan, Bandwidths(node_storage=2 * GB, nic=1 * GB, intra=10 * GB))
    assert sum(pred.read_bytes_per_node) == plan.index.total_bytes  # read once per job
    assert pred.seconds >= pred.lower_bound
    if placement != "replicate":  # point to point: what leaves one node enters another
        assert sum(pred.nic_bytes_out) == sum(pred.nic_bytes_in)
    # what crosses the network is what ranks on other nodes than the reader receive
    received = sum(t.received for t in traffic(plan))
    assert sum(pred.nic_bytes_in) + sum(pred.intra_bytes) >= min(received, 1)
    stats = traffic(plan)
    assert pred.peak_rank_bytes == max(s.held + s.staging for s in stats)


def test_slow_network_becomes_the_bottleneck() -> None:
    plan = _plan(8, 4, None)  # replicate everything: every node needs every byte
    fast = simulate(plan, Bandwidths(node_storage=1 * GB, nic=100 * GB, intra=100 * GB))
    slow = simulate(plan, Bandwidths(node_storage=1 * GB, nic=0.01 * GB, intra=100 * GB))
    assert fast.bottleneck == "storage"
    assert slow.bottleneck == "nic"
    total = plan.index.total_bytes
    # the other node must receive the whole checkpoint but the half it read itself
    assert sum(slow.nic_bytes_in) == pytest.approx(total, rel=0.01)
    assert slow.seconds >= total / 2 / (0.01 * GB)


def test_shared_storage_caps_the_lower_bound() -> None:
    plan = _plan(8, 4, distload.TensorParallel(preset("llama")))
    pred = simulate(
        plan, Bandwidths(node_storage=10 * GB, shared_storage=1 * GB, nic=100 * GB, intra=100 * GB)
    )
    assert pred.lower_bound == pytest.approx(plan.index.total_bytes / GB)
    assert pred.seconds >= pred.lower_bound


def test_cli_simulates_a_real_model_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "plan",
            "model:llama-8b",
            "--world",
            "16",
            "--ranks-per-node",
            "8",
            "--tp",
            "8",
            "--dp",
            "2",
            "--simulate",
            "--bucket-mb",
            "256",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "predicted" in out and "lower bound" in out
    assert out.count("GiB") >= 4
    assert math.isfinite(float(out.split("predicted ")[1].split(" s")[0]))


def test_cli_rejects_unknown_model() -> None:
    with pytest.raises(SystemExit, match="unknown model"):
        main(["plan", "model:gpt-99", "--world", "2"])


def test_replicas_over_nodes_approach_the_network_bound() -> None:
    """dp4 x tp4, one TP group per node: every node needs every byte, so each node's NIC must
    take in the 3/4 it did not read. Serving each class of replicas by one multicast (reader ->
    root on its node -> broadcast across nodes) keeps each bucket's traffic spread over all
    NICs; sending every replica its slice from the reader alone would load the reader's NIC
    with three copies per bucket."""
    world, per_node = 16, 4
    plan = _plan(world, per_node, distload.Mesh(dp=4, tp=4, tp_rules=preset("llama")))
    assert plan.multicast_groups()
    nic = 0.01 * GB
    pred = simulate(plan, Bandwidths(node_storage=100 * GB, nic=nic, intra=1000 * GB))
    total = plan.index.total_bytes
    bound = max(total - read for read in pred.read_bytes_per_node) / nic
    assert max(pred.nic_bytes_in) <= total
    assert pred.bottleneck == "nic"
    assert bound <= pred.seconds <= 1.3 * bound


def test_pipeline_stages_overlap_and_approach_the_storage_bound() -> None:
    """pp4 x tp4, one stage per node, intra-node links as slow as storage: each stage's
    buckets are read inside the stage and involve only its ranks, so the four stages move at
    the same time and the load ends near what one node's reads plus its own transfers take.
    With a status check before every bucket the stages would take turns."""
    world, per_node = 16, 4
    plan = _plan(world, per_node, distload.Mesh(pp=4, tp=4, tp_rules=preset("llama")))
    for b in plan.buckets:  # p2p buckets are read by one of their own receivers
        if b.kind == "p2p":
            assert any(b.reader in c for c in b.classes)
    bw = Bandwidths(node_storage=1 * GB, nic=100 * GB, intra=1 * GB, latency=0.0)
    pred = simulate(plan, bw)
    serial = simulate(dataclasses.replace(plan, check_every=1), bw)
    assert sum(pred.nic_bytes_in) == 0  # a stage's traffic stays on its node
    assert pred.seconds >= pred.lower_bound
    one_node = (max(pred.read_bytes_per_node) + max(pred.intra_bytes)) / GB
    assert pred.seconds <= 1.3 * one_node
    assert serial.seconds > 1.3 * pred.seconds


@pytest.mark.parametrize(
    ("name", "billions", "tensors"),
    [("qwen3-30b-a3b", 30.5, 18867), ("qwen3-235b-a22b", 235.1, 36945)],
)
def test_moe_shapes_have_the_real_parameter_count_and_plan_with_their_preset(
    name: str, billions: float, tensors: int
) -> None:
    """Mixture-of-experts families: the published parameter counts, tens of thousands of
    tensors, and the qwen3_moe preset shards every expert (TP 8: each rank holds an eighth of
    every expert's bytes) while the router and norms stay whole."""
    from distload.placement import TensorParallel, preset
    from distload.planner import traffic

    shape = MODELS[name]
    assert isinstance(shape, MoeShape)
    index = model_index(shape)
    assert len(index.tensors) == tensors
    assert index.total_bytes / 2 / 1e9 == pytest.approx(billions, rel=0.005)
    if name != "qwen3-30b-a3b":
        return
    plan = make_plan(index, 8, TensorParallel(preset("qwen3_moe")), bucket_bytes=64 * 2**20)
    by_name = {o.name: plan.layouts[i] for i, o in enumerate(plan.outputs)}
    assert by_name["model.layers.0.mlp.experts.5.gate_proj.weight"].dim == 0
    assert by_name["model.layers.0.mlp.experts.5.down_proj.weight"].dim == 1
    assert by_name["model.layers.0.mlp.gate.weight"].dim is None
    assert by_name["model.layers.0.self_attn.q_norm.weight"].dim is None
    expert_bytes = sum(t.nbytes for t in index.tensors if ".experts." in t.name)
    held = [s.held for s in traffic(plan)]
    assert min(held) >= expert_bytes // 8 and max(held) - min(held) < 0.01 * max(held)
    assert sum(s.read for s in traffic(plan)) == index.total_bytes


def test_deepseek_v3_shape_matches_the_published_checkpoint() -> None:
    """91,991 tensors (the published index), 671B parameters plus the 14B multi-token-prediction
    layer, fp8 projections each with float32 128x128 block scales, the rest bf16."""
    from distload.shapes import DeepseekShape

    shape = MODELS["deepseek-v3"]
    assert isinstance(shape, DeepseekShape)
    index = model_index(shape)
    assert len(index.tensors) == 91_991
    size = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    params = [
        (t.name, t.nbytes // size[t.dtype])
        for t in index.tensors
        if not t.name.endswith("weight_scale_inv")
    ]
    main = sum(n for name, n in params if not name.startswith("model.layers.61."))
    assert main / 1e9 == pytest.approx(671.0, rel=0.001)
    assert sum(n for _, n in params) / 1e9 == pytest.approx(684.5, rel=0.001)
    assert index.total_bytes / 1e9 == pytest.approx(688.6, rel=0.001)
    by = {t.name: t for t in index.tensors}
    w = by["model.layers.3.mlp.experts.255.down_proj.weight"]
    s = by["model.layers.3.mlp.experts.255.down_proj.weight_scale_inv"]
    assert (w.dtype, w.shape, s.dtype, s.shape) == ("F8_E4M3", (7168, 2048), "F32", (56, 16))
    assert by["model.layers.2.mlp.gate_proj.weight"].shape == (18432, 7168)  # dense layer
    assert "model.layers.2.mlp.gate.weight" not in by
    assert by["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 56)
    assert by["model.layers.61.shared_head.head.weight"].dtype == "BF16"
    assert sum(1 for t in index.tensors if ".mlp.experts." in t.name) == 59 * 256 * 6


@pytest.mark.parametrize("tp", [8, 16])
def test_deepseek_v3_preset_cuts_block_scales_with_their_weights(tp: int) -> None:
    """Every fp8 weight's scales are cut on the weight's dim into the same number of chunks, and
    each chunk of the weight is a whole number of 128-row/column blocks (so a rank's scales
    are exactly those of its rows)."""
    from distload.placement import TensorParallel

    index = model_index(MODELS["deepseek-v3"])
    layouts = TensorParallel(preset("deepseek_v3")).layouts(index.tensors, tp)
    by = {t.name: (t, lay) for t, lay in zip(index.tensors, layouts, strict=True)}
    sharded = 0
    for name, (scale, lay) in by.items():
        if not name.endswith(".weight_scale_inv"):
            continue
        weight, wlay = by[name.removesuffix("_scale_inv")]
        assert (lay.dim, lay.chunks) == (wlay.dim, wlay.chunks), name
        if lay.dim is not None:
            sharded += 1
            assert weight.shape[lay.dim] % (128 * tp) == 0, name
            assert scale.shape[lay.dim] % tp == 0, name
    # q_b, kv_b, o_proj, and the gate/up/down of every MLP are cut; q_a and kv_a stay whole
    assert sharded == 61 * 3 + 3 * 3 + 59 * 257 * 3 + 3
    assert by["model.layers.9.self_attn.q_a_proj.weight"][1].dim is None
    assert by["model.layers.9.mlp.gate.e_score_correction_bias"][1].dim is None


def test_expert_parallel_deepseek_v3_reads_experts_where_they_are_held() -> None:
    """DeepSeek-V3 on 4 nodes x 8 with attention TP 8 and experts over EP 32: each rank holds
    8 routed experts per layer, read by itself (local buckets, no transfer), and only the
    attention and dense tensors cross the network."""
    index = model_index(MODELS["deepseek-v3"])
    mesh = distload.Mesh(dp=4, tp=8, ep=32, tp_rules=preset("deepseek_v3"))
    plan = make_plan(index, 32, mesh, nodes=[r // 8 for r in range(32)])
    routed = {i for i, t in enumerate(index.tensors) if ".mlp.experts." in t.name}
    routed_bytes = sum(index.tensors[i].nbytes for i in routed)
    for bucket in plan.buckets:
        if any(item.tensor in routed for item in bucket.items):
            assert bucket.kind == "local"
    flows = traffic(plan)
    assert sum(f.read for f in flows) == index.total_bytes
    dense = distload.Mesh(dp=4, tp=8, tp_rules=preset("deepseek_v3"))
    dense_held = traffic(make_plan(index, 32, dense, nodes=[r // 8 for r in range(32)]))
    for f, d in zip(flows, dense_held, strict=True):
        # whole experts over 32 groups instead of every expert cut in 8
        assert f.held - d.held == routed_bytes // 32 - routed_bytes // 8
    sim = simulate(plan, Bandwidths(node_storage=2 * GB))
    assert sim.seconds == pytest.approx(sim.lower_bound, rel=0.05)
