"""Placement slicing: chunk arithmetic, every rule form, uneven and empty chunks, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from distload.checkpoint import TensorMeta
from distload.errors import PlacementError
from distload.placement import REPLICATED, Layout, TensorParallel, local_box, preset
from distload.placement.base import box_shape, chunk_range


def meta(name: str, shape: tuple[int, ...], dtype: str = "BF16") -> TensorMeta:
    n = 1
    for d in shape:
        n *= d
    return TensorMeta(name, "f.safetensors", dtype, shape, 0, n * 2)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 7, 8, 13])
@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 6])
def test_chunk_range_matches_torch_chunk(size: int, chunks: int) -> None:
    pieces = torch.arange(size).chunk(chunks) if size else ()
    for i in range(chunks):
        start, stop = chunk_range(size, chunks, i)
        expected = pieces[i].tolist() if i < len(pieces) else []
        assert list(range(start, stop)) == expected


@pytest.mark.parametrize(
    ("spec", "shape", "dim"),
    [
        ("colwise", (8, 4), 0),
        ("colwise", (8,), 0),
        ("rowwise", (8, 4), 1),
        ("rowwise", (8,), None),
        ("rowwise", (2, 3, 4), 2),
        ("replicate", (8, 4), None),
        (Shard(0), (8, 4), 0),
        (Shard(1), (8, 4), 1),
        (Shard(-1), (2, 3, 4), 2),
        (Shard(1), (2, 3, 4), 1),
        (Replicate(), (8, 4), None),
    ],
)
def test_rule_forms(spec: object, shape: tuple[int, ...], dim: int | None) -> None:
    layout = TensorParallel({"w": spec}).layout(meta("w", shape), 4)
    assert layout.dim == dim
    assert layout.chunks == (4 if dim is not None else 1)


def test_first_match_wins_and_unmatched_replicate() -> None:
    tp = TensorParallel({"*.q_proj.weight": "colwise", "*.weight": "rowwise"})
    assert tp.layout(meta("l.q_proj.weight", (8, 8)), 2).dim == 0
    assert tp.layout(meta("l.o_proj.weight", (8, 8)), 2).dim == 1
    assert tp.layout(meta("l.o_proj.bias", (8,)), 2) == REPLICATED


@pytest.mark.parametrize(
    ("shape", "dim", "world", "expected"),
    [
        ((10, 3), 0, 4, [(3, 3), (3, 3), (3, 3), (1, 3)]),
        ((3,), 0, 4, [(1,), (1,), (1,), (0,)]),
        ((2, 5), 1, 4, [(2, 2), (2, 2), (2, 1), (2, 0)]),
        ((3, 10, 9), 1, 4, [(3, 3, 9), (3, 3, 9), (3, 3, 9), (3, 1, 9)]),
        ((0, 8), 0, 2, [(0, 8), (0, 8)]),
        ((4, 6), 1, 3, [(4, 2), (4, 2), (4, 2)]),
    ],
)
def test_local_shapes(
    shape: tuple[int, ...], dim: int, world: int, expected: list[tuple[int, ...]]
) -> None:
    layout = TensorParallel({"w": Shard(dim)}).layout(meta("w", shape), world)
    shapes = [box_shape(local_box(shape, layout, r)) for r in range(world)]  # type: ignore[arg-type]
    assert shapes == expected
    # the same as torch.chunk (padded with empty chunks like DTensor)
    full = torch.zeros(shape)
    chunks = full.chunk(world, dim) if full.shape[dim] else ()
    for r in range(world):
        if r < len(chunks):
            assert tuple(chunks[r].shape) == shapes[r]


def test_tp_size_smaller_than_world_makes_replicas() -> None:
    layout = TensorParallel({"w": "colwise"}, size=2).layout(meta("w", (8, 2)), 4)
    boxes = [local_box((8, 2), layout, r) for r in range(4)]
    assert boxes[0] == boxes[2] == ((0, 4), (0, 2))
    assert boxes[1] == boxes[3] == ((4, 8), (0, 2))


@pytest.mark.parametrize(
    ("rules", "shape", "size", "world", "message"),
    [
        ({"w": Shard(2)}, (4, 4), None, 2, "shards dim 2"),
        ({"w": Shard(-3)}, (4, 4), None, 2, "shards dim -3"),
        ({"w": "colwise"}, (), None, 2, "cannot shard 0-d"),
        ({"w": "colwise"}, (4, 4), 3, 4, "world_size(4) % tp(3) = 1"),
    ],
)
def test_placement_errors(
    rules: dict[str, object], shape: tuple[int, ...], size: int | None, world: int, message: str
) -> None:
    with pytest.raises(PlacementError) as info:
        TensorParallel(rules, size=size).layout(meta("w", shape), world)
    assert message in str(info.value)


@pytest.mark.parametrize("bad", ["diagonal", 3, None])
def test_unknown_rule_lists_valid_choices(bad: object) -> None:
    with pytest.raises(PlacementError, match="valid: Shard"):
        TensorParallel({"w": bad})


def test_bad_size() -> None:
    with pytest.raises(PlacementError, match="positive integer"):
        TensorParallel({}, size=0)


def test_layout_json_roundtrip() -> None:
    for layout in (Layout(), Layout(1, 4), Layout(0, 2, (3, 1)), Layout(None, 1, (2,), True)):
        assert Layout.from_json(layout.to_json()) == layout


def test_holders_subset() -> None:
    layout = Layout(0, 2, (3, 1))
    assert local_box((4,), layout, 0) is None
    assert local_box((4,), layout, 3) == ((0, 2),)
    assert local_box((4,), layout, 1) == ((2, 4),)


def test_presets() -> None:
    rules = preset("llama")
    assert rules["*.self_attn.o_proj.weight"] == "rowwise"
    with pytest.raises(PlacementError, match="valid: "):
        preset("nope")


def test_mixtral_and_qwen2_presets() -> None:
    tp = TensorParallel(preset("mixtral"))
    w1 = tp.layout(meta("model.layers.0.block_sparse_moe.experts.3.w1.weight", (8, 4)), 2)
    w2 = tp.layout(meta("model.layers.0.block_sparse_moe.experts.3.w2.weight", (4, 8)), 2)
    gate = tp.layout(meta("model.layers.0.block_sparse_moe.gate.weight", (8, 4)), 2)
    assert (w1.dim, w2.dim, gate.dim) == (0, 1, None)
    qwen = TensorParallel(preset("qwen2"))
    assert qwen.layout(meta("model.layers.0.self_attn.k_proj.bias", (8,)), 2).dim == 0


def test_registered_preset_with_transforms() -> None:
    from distload.placement import preset_transforms, register_preset
    from distload.transforms import Transpose

    register_preset("mine", {"*.w": "colwise"}, [Transpose(".w")])
    assert preset("mine") == {"*.w": "colwise"}
    assert len(preset_transforms("mine")) == 1
    assert preset_transforms("llama") == []


def test_rules_that_shard_nothing_are_an_error_and_unmatched_ones_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from distload.errors import PlacementError

    metas = [
        TensorMeta("model.layers.0.self_attn.q_proj.weight", "f", "F32", (8, 4), 0, 128),
        TensorMeta("model.norm.weight", "f", "F32", (4,), 128, 16),
    ]
    # another family's rules (GPT-2's) match no tensor of a Llama checkpoint
    plan = {"*.attn.c_attn.weight": "colwise", "*.mlp.c_proj.weight": "rowwise"}
    with pytest.raises(PlacementError, match="shards no tensor"):
        TensorParallel(plan).layouts(metas, 2)
    rules = {"*.q_proj.weight": "colwise", "*.no_such.weight": "rowwise"}
    with caplog.at_level("WARNING"):
        layouts = TensorParallel(rules).layouts(metas, 2)
    assert layouts[0].dim == 0 and "'*.no_such.weight'" in caplog.text
    assert TensorParallel(plan).layouts(metas, 1)  # a group of one shards nothing anyway


def test_cli_tp_preset_follows_the_checkpoint_model_type(tmp_path: Path) -> None:
    import json

    from distload.cli.args import default_preset

    assert default_preset(str(tmp_path)) == "llama"  # no config.json: llama, with a warning
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert default_preset(str(tmp_path)) == "qwen2"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SystemExit, match="model_type 'bert', which has no TP preset"):
        default_preset(str(tmp_path))
    assert default_preset("model:deepseek-v3") == "deepseek_v3"


def _llama_metas() -> list[TensorMeta]:
    shapes = {
        "model.embed_tokens.weight": (32, 8),
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.0.self_attn.q_proj.bias": (8,),
        "model.layers.0.self_attn.o_proj.weight": (8, 8),
        "model.layers.0.self_attn.o_proj.bias": (8,),
        "model.norm.weight": (8,),
        "lm_head.weight": (32, 8),
    }
    out, offset = [], 0
    for name, shape in shapes.items():
        nbytes = 4 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        out.append(TensorMeta(name, "f", "F32", shape, offset, nbytes))
        offset += nbytes
    return out


def test_transformers_plans_shard_like_torch_styles() -> None:
    """Module-path rules (transformers' tp_plan and the prefix-less base_model_tp_plan) apply
    to the module's weight and bias with torch's styles: colwise -> weight and bias Shard(0),
    rowwise -> weight Shard(-1), bias replicated; embedding_rowwise -> the vocabulary."""
    metas = _llama_metas()
    base_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
    }
    model_plan = {"lm_head": "colwise_gather_output", "model.embed_tokens": "embedding_rowwise"}
    dims = [lay.dim for lay in TensorParallel({**base_plan, **model_plan}).layouts(metas, 2)]
    assert dims == [0, 0, 0, 1, None, None, 0]


def test_colwise_and_rowwise_on_an_embedding_follow_torch() -> None:
    """torch's ColwiseParallel on nn.Embedding shards the embedding dim (Shard(1)) and
    RowwiseParallel the vocabulary (Shard(0)): the reverse of a Linear."""
    metas = _llama_metas()
    col = TensorParallel({"model.embed_tokens.weight": "colwise", "lm_head.weight": "colwise"})
    assert [lay.dim for lay in col.layouts(metas, 2)][::6] == [1, 0]
    row = TensorParallel({"model.embed_tokens": "rowwise", "lm_head": "rowwise"})
    assert [lay.dim for lay in row.layouts(metas, 2)][::6] == [0, 1]


def test_transformers_styles_without_a_contiguous_layout_are_refused() -> None:
    from distload.errors import PlacementError

    with pytest.raises(PlacementError, match=r"packed_colwise.*Split"):
        TensorParallel({"*.mlp.experts.gate_up_proj": "packed_colwise"})
    with pytest.raises(PlacementError, match="unknown placement 'colwize'"):
        TensorParallel({"*": "colwize"})


def test_cli_rules_take_transformers_strings() -> None:
    import argparse

    from distload.cli.args import parse_rule

    assert parse_rule("model.embed_tokens=embedding_rowwise") == (
        "model.embed_tokens",
        "embedding_rowwise",
    )
    assert parse_rule("lm_head=colwise_gather_output")[1] == "colwise_gather_output"
    with pytest.raises(argparse.ArgumentTypeError, match="embedding_rowwise"):
        parse_rule("x=sideways")
