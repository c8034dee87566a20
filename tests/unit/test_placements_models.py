"""Pipeline stages, device maps and meshes: pure layouts, coverage and errors."""

from __future__ import annotations

import pytest
from torch.distributed.tensor import Shard

from distload.checkpoint import TensorMeta
from distload.errors import PlacementError
from distload.placement import DeviceMap, Layout, Mesh, PipelineParallel, local_box
from distload.placement.modules import block_key, group_blocks, split_contiguous
from distload.synthetic import LlamaShape, llama_tensors


def llama_metas(layers: int = 4, tied: bool = False) -> list[TensorMeta]:
    out = []
    for name, shape in llama_tensors(LlamaShape(layers=layers)).items():
        if tied and name == "lm_head.weight":
            continue
        n = 1
        for d in shape:
            n *= d
        out.append(TensorMeta(name, "f.safetensors", "BF16", shape, 0, n * 2))
    return out


def owners(layouts: list[Layout], metas: list[TensorMeta]) -> dict[str, tuple[int, ...]]:
    return {m.name: lay.holders for m, lay in zip(metas, layouts, strict=True)}  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("model.layers.12.mlp.up_proj.weight", ("model.layers.12", 12)),
        ("transformer.h.0.attn.c_attn.weight", ("transformer.h.0", 0)),
        ("model.embed_tokens.weight", ("model.embed_tokens", None)),
        ("lm_head.weight", ("lm_head", None)),
        ("scale", ("scale", None)),
    ],
)
def test_block_key(name: str, key: tuple[str, int | None]) -> None:
    assert block_key(name) == key


def test_blocks_in_execution_order() -> None:
    metas = llama_metas(layers=12)
    prefixes = [b.prefix for b in group_blocks(metas)]
    assert prefixes[0] == "model.embed_tokens"
    assert prefixes[1:13] == [f"model.layers.{i}" for i in range(12)]
    assert set(prefixes[13:]) == {"model.norm", "lm_head"}


@pytest.mark.parametrize(
    ("sizes", "parts", "expected"),
    [
        ([1, 1, 1, 1], 2, [0, 0, 1, 1]),
        ([1, 1, 1, 1, 1, 1], 3, [0, 0, 1, 1, 2, 2]),
        ([10, 1, 1, 1], 2, [0, 1, 1, 1]),
        ([1, 1], 4, [0, 1]),
        ([5], 1, [0]),
        ([0, 0, 0], 3, [0, 1, 2]),
    ],
)
def test_split_contiguous(sizes: list[int], parts: int, expected: list[int]) -> None:
    assert split_contiguous(sizes, parts) == expected


def test_auto_pipeline_balances_layers_and_puts_ends_right() -> None:
    metas = llama_metas(layers=4)
    got = owners(PipelineParallel(num_stages=2).layouts(metas, 2), metas)
    assert got["model.embed_tokens.weight"] == (0,)
    assert got["model.layers.0.mlp.up_proj.weight"] == (0,)
    assert got["model.layers.1.self_attn.q_proj.weight"] == (0,)
    assert got["model.layers.2.self_attn.q_proj.weight"] == (1,)
    assert got["model.layers.3.input_layernorm.weight"] == (1,)
    assert got["model.norm.weight"] == (1,)
    assert got["lm_head.weight"] == (1,)


def test_tied_embedding_goes_to_both_ends() -> None:
    metas = llama_metas(layers=4, tied=True)
    got = owners(PipelineParallel(num_stages=3).layouts(metas, 3), metas)
    assert got["model.embed_tokens.weight"] == (0, 2)
    got = owners(PipelineParallel(num_stages=3, tie_word_embeddings=False).layouts(metas, 3), metas)
    assert got["model.embed_tokens.weight"] == (0,)


def test_explicit_stages_and_uncovered_error() -> None:
    metas = llama_metas(layers=2)
    stages = [
        ["model.embed_tokens", "model.layers.0"],
        ["model.layers.1", "model.norm", "lm_head", "model.embed_tokens"],
    ]
    got = owners(PipelineParallel(stages).layouts(metas, 2), metas)
    assert got["model.embed_tokens.weight"] == (0, 1)
    assert got["model.layers.1.mlp.down_proj.weight"] == (1,)
    with pytest.raises(PlacementError, match=r"2 tensor\(s\) belong to no pipeline stage"):
        PipelineParallel([["model.layers"], ["model.norm"]]).layouts(metas, 2)


def test_pipeline_size_mismatch_shows_arithmetic() -> None:
    with pytest.raises(PlacementError, match=r"pp\(2\) != world_size\(3\)"):
        PipelineParallel(num_stages=2).layouts(llama_metas(), 3)


@pytest.mark.parametrize("bad", [dict(), dict(stages=[["a"]], num_stages=1), dict(num_stages=0)])
def test_pipeline_argument_errors(bad: dict[str, object]) -> None:
    with pytest.raises(PlacementError):
        PipelineParallel(**bad)  # type: ignore[arg-type]


def test_explicit_device_map_longest_prefix_wins() -> None:
    metas = llama_metas(layers=2)
    dm = DeviceMap({"": 0, "model.layers.1": 1, "model.layers.1.mlp": 2, "lm_head": "cpu"})
    layouts = dm.layouts(metas, 3)
    by = {m.name: lay for m, lay in zip(metas, layouts, strict=True)}
    assert by["model.layers.0.mlp.up_proj.weight"].holders == (0,)
    assert by["model.layers.1.self_attn.q_proj.weight"].holders == (1,)
    assert by["model.layers.1.mlp.up_proj.weight"].holders == (2,)
    assert by["lm_head.weight"] == Layout(None, 1, (0,), host=True)


def test_device_map_uncovered_lists_names() -> None:
    with pytest.raises(PlacementError, match="covers no entry") as info:
        DeviceMap({"model.layers": 0}).layouts(llama_metas(layers=1), 2)
    assert "model.embed_tokens.weight" in str(info.value)


@pytest.mark.parametrize(
    ("dm", "message"),
    [
        ({"a": -1}, "expected a rank or 'cpu'"),
        ({"a": "gpu"}, "expected a rank or 'cpu'"),
        ("fastest", "valid: ['auto', 'balanced', 'balanced_low_0', 'sequential']"),
    ],
)
def test_device_map_errors(dm: object, message: str) -> None:
    with pytest.raises(PlacementError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DeviceMap(dm)  # type: ignore[arg-type]


def test_device_map_rank_outside_group() -> None:
    with pytest.raises(PlacementError, match=r"ranks 0..1"):
        DeviceMap({"": 5}).layouts(llama_metas(), 2)


def test_balanced_map_keeps_layers_whole_and_contiguous() -> None:
    metas = llama_metas(layers=8)
    resolved = DeviceMap("auto").resolve(metas, 4)
    ranks = [resolved[f"model.layers.{i}"] for i in range(8)]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1, 2, 3}
    assert resolved["model.embed_tokens"] == 0 and resolved["lm_head"] == 3


def test_sequential_map_fills_ranks_then_cpu() -> None:
    metas = llama_metas(layers=4)
    layer = sum(m.nbytes for m in metas if m.name.startswith("model.layers.0."))
    embed = 1000 * 64 * 2
    limit = embed + 2 * layer
    resolved = DeviceMap("sequential", max_memory={0: limit, 1: layer}).resolve(metas, 2)
    assert resolved["model.embed_tokens"] == 0
    assert [resolved[f"model.layers.{i}"] for i in range(4)] == [0, 0, 1, "cpu"]
    assert resolved["lm_head"] == "cpu"


def test_no_split_merges_modules() -> None:
    metas = llama_metas(layers=2)
    resolved = DeviceMap("balanced", no_split=["model"]).resolve(metas, 2)
    assert "model" in resolved and "model.layers.0" not in resolved


def test_cpu_overflow_error() -> None:
    with pytest.raises(PlacementError, match="do not fit max_memory"):
        DeviceMap("sequential", max_memory={0: 10, "cpu": 10}).resolve(llama_metas(), 1)


def test_mesh_dp_pp_tp() -> None:
    metas = llama_metas(layers=4)
    mesh = Mesh(
        dp=2, pp=2, tp=2, tp_rules={"*.q_proj.weight": "colwise", "*.o_proj.weight": Shard(1)}
    )
    layouts = mesh.layouts(metas, 8)
    by = {m.name: lay for m, lay in zip(metas, layouts, strict=True)}
    # stage 0 = ranks with pp coordinate 0: 0, 1 (dp 0) and 4, 5 (dp 1)
    q0 = by["model.layers.0.self_attn.q_proj.weight"]
    assert q0.holders == (0, 1, 4, 5) and q0.dim == 0 and q0.chunks == 2
    shape = (64, 64)
    assert local_box(shape, q0, 0) == local_box(shape, q0, 4) == ((0, 32), (0, 64))
    assert local_box(shape, q0, 1) == local_box(shape, q0, 5) == ((32, 64), (0, 64))
    assert local_box(shape, q0, 2) is None
    o3 = by["model.layers.3.self_attn.o_proj.weight"]
    assert o3.holders == (2, 3, 6, 7) and o3.dim == 1
    assert by["model.norm.weight"].holders == (2, 3, 6, 7) and by["model.norm.weight"].dim is None
    assert mesh.coords(6) == (1, 1, 0)


def test_mesh_size_mismatch() -> None:
    with pytest.raises(
        PlacementError, match=r"dp\(2\) \* pp\(2\) \* tp\(2\) = 8 != world_size\(6\)"
    ):
        Mesh(dp=2, pp=2, tp=2).layouts(llama_metas(), 6)
