"""Device maps and pipeline stages over real transformers models' module trees (built on meta,
no weights): whole modules per rank, ties, offload order, max_memory sizes, balanced_low_0."""

from __future__ import annotations

import argparse
import math
from typing import Any

import pytest
import torch

from distload.errors import DistLoadError, PlacementError
from distload.index import TensorMeta
from distload.placement import DeviceMap, PipelineParallel
from distload.placement.device_map import parse_max_memory, parse_size
from tests.distributed.cases import SMALL_BERT, SMALL_LLAMA

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

BERT = dict(SMALL_BERT, num_hidden_layers=4)


def meta_model(kind: str, cls: str, **cfg: Any) -> torch.nn.Module:
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.for_model(kind, **cfg)
    with init_empty_weights():
        return getattr(transformers, cls)(config)


def metas_of(model: torch.nn.Module) -> list[TensorMeta]:
    """The model's state dict as checkpoint records (tied names once, as save_pretrained)."""
    from distload.materialize.model import declared_ties

    targets = {target for target, _ in declared_ties(model)}
    out, offset, seen = [], 0, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen or name in targets:
            continue
        seen.add(id(tensor))
        nbytes = math.prod(tensor.shape) * tensor.element_size()
        out.append(TensorMeta(name, "f", "F32", tuple(tensor.shape), offset, nbytes))
        offset += nbytes
    return out


def holders(dm: DeviceMap, metas: list[TensorMeta], world: int) -> dict[str, tuple[int, ...]]:
    layouts = dm.layouts(metas, world)
    return {m.name: lay.holders for m, lay in zip(metas, layouts, strict=True)}


def test_bert_embeddings_stay_on_one_rank_with_and_without_the_model() -> None:
    model = meta_model("bert", "BertModel", **BERT)
    metas = metas_of(model)
    for dm in (DeviceMap("auto").for_model(model), DeviceMap("auto")):
        owner = holders(dm, metas, 2)
        embedding = {owner[m.name] for m in metas if m.name.startswith("embeddings.")}
        assert embedding == {(0,)}, (dm.tree is not None, embedding)
    resolved = DeviceMap("auto").for_model(model).resolve(metas, 2)
    assert resolved["embeddings"] == 0 and resolved["pooler"] == 1  # BertEmbeddings whole
    assert "embeddings.word_embeddings" not in resolved


def test_no_split_class_names_need_the_model_and_must_exist() -> None:
    model = meta_model("bert", "BertModel", **BERT)
    metas = metas_of(model)
    resolved = DeviceMap("auto", no_split=["BertEncoder"]).for_model(model).resolve(metas, 2)
    assert "encoder" in resolved and "encoder.layer.0" not in resolved
    with pytest.raises(PlacementError, match="class names need the model"):
        DeviceMap("auto", no_split=["BertEncoder"]).resolve(metas, 2)
    with pytest.raises(PlacementError, match="name no class and no module path"):
        DeviceMap("auto", no_split=["BertBlock"]).for_model(model)


def test_a_no_split_prefix_gathers_runs_that_are_not_adjacent() -> None:
    metas = [
        TensorMeta("model.embed_tokens.weight", "f", "F32", (4,), 0, 16),  # runs first
        TensorMeta("model.layers.0.w", "f", "F32", (4,), 16, 16),
        TensorMeta("lm_head.weight", "f", "F32", (4,), 32, 16),
        TensorMeta("model.norm.weight", "f", "F32", (4,), 48, 16),  # after the head
    ]
    resolved = DeviceMap("auto", no_split=["model"]).resolve(metas, 2)
    assert resolved == {"model": 0, "lm_head": 1}  # one key, one rank: no run doubled


def test_a_tied_head_gets_the_embedding_on_its_rank() -> None:
    model = meta_model("qwen2", "Qwen2ForCausalLM", **dict(SMALL_LLAMA, tie_word_embeddings=True))
    metas = metas_of(model)
    assert "lm_head.weight" not in {m.name for m in metas}
    dm = DeviceMap("auto").for_model(model)
    resolved = dm.resolve(metas, 2)
    assert resolved["model.embed_tokens"] == 0 and resolved["lm_head"] == 1
    assert holders(dm, metas, 2)["model.embed_tokens.weight"] == (0, 1)


def test_buffer_only_modules_are_in_the_map() -> None:
    model = meta_model("llama", "LlamaForCausalLM", **SMALL_LLAMA)
    metas = metas_of(model)
    resolved = DeviceMap("auto").for_model(model).resolve(metas, 2)
    assert resolved["model.rotary_emb"] in (0, 1)
    assert list(resolved).index("model.rotary_emb") > list(resolved).index("model.norm")


def test_offload_keeps_the_model_order() -> None:
    """Once a module goes to cpu every later one does: never norm and lm_head on a rank while
    the last layers sit on cpu."""
    model = meta_model("llama", "LlamaForCausalLM", **dict(SMALL_LLAMA, num_hidden_layers=8))
    metas = metas_of(model)
    layer = sum(m.nbytes for m in metas if m.name.startswith("model.layers.0."))
    resolved = DeviceMap("auto", max_memory={0: 3 * layer, 1: 3 * layer}).for_model(model)
    got = resolved.resolve(metas, 2)
    order = [got[k] for k in got]
    first_cpu = order.index("cpu")
    assert all(t == "cpu" for t in order[first_cpu:]), got
    assert got["lm_head"] == "cpu" and got["model.norm"] == "cpu"


def test_balanced_low_0_leaves_rank_0_free() -> None:
    model = meta_model("llama", "LlamaForCausalLM", **dict(SMALL_LLAMA, num_hidden_layers=4))
    metas = metas_of(model)
    got = DeviceMap("balanced_low_0").for_model(model).resolve(metas, 3)
    assert 0 not in got.values() and {1, 2} <= set(got.values())
    layers = [got[f"model.layers.{i}"] for i in range(4)]
    assert layers == sorted(layers)


def test_max_memory_takes_accelerate_sizes() -> None:
    assert parse_size("10GiB", "x") == 10 * 2**30
    assert parse_size("1.5 GB", "x") == 1_500_000_000
    assert parse_size("500MB", "x") == 500_000_000 and parse_size(7, "x") == 7
    assert parse_max_memory({"0": "1KiB", 1: 10, "cpu": "2kb"}) == {0: 1024, 1: 10, "cpu": 2000}
    with pytest.raises(PlacementError, match=r"max_memory\[0\] = '10 gigs'"):
        parse_max_memory({0: "10 gigs"})
    with pytest.raises(PlacementError, match="expected a rank"):
        parse_max_memory({"cuda:0": "1GiB"})
    metas = metas_of(meta_model("llama", "LlamaForCausalLM", **SMALL_LLAMA))
    total = sum(m.nbytes for m in metas)
    got = DeviceMap("sequential", max_memory={0: f"{total}B", 1: 0}).resolve(metas, 2)
    assert set(got.values()) == {0}


def test_disk_is_refused_saying_what_to_do() -> None:
    for make in (
        lambda: DeviceMap("disk"),
        lambda: DeviceMap({"": "disk"}),
        lambda: DeviceMap("auto", max_memory={"disk": "100GiB"}),
    ):
        with pytest.raises(PlacementError, match=r"runs no offload hooks.*use 'cpu'"):
            make()


def test_pipeline_keeps_bert_embeddings_whole_and_untied() -> None:
    model = meta_model("bert", "BertModel", **BERT)
    metas = metas_of(model)
    for pp in (PipelineParallel(num_stages=2), PipelineParallel(num_stages=2).for_model(model)):
        stages = dict(zip((m.name for m in metas), pp.assign(metas), strict=True))
        assert {stages[n] for n in stages if n.startswith("embeddings.")} == {(0,)}
        assert stages["pooler.dense.weight"] == (1,)


def test_pipeline_ties_follow_the_model() -> None:
    tied = meta_model("qwen2", "Qwen2ForCausalLM", **dict(SMALL_LLAMA, tie_word_embeddings=True))
    untied = meta_model("llama", "LlamaForCausalLM", **SMALL_LLAMA)
    assert PipelineParallel(num_stages=2).for_model(tied).tie_word_embeddings is True
    assert PipelineParallel(num_stages=2).for_model(untied).tie_word_embeddings is False
    metas = metas_of(tied)
    stages = dict(zip((m.name for m in metas), PipelineParallel(num_stages=2).assign(metas)))
    assert stages["model.embed_tokens.weight"] == (0, 1)  # no head: a decoder's tie


def test_cli_max_memory_and_no_split() -> None:
    from distload.cli.args import device_map, max_memory, placement_of

    args = argparse.Namespace(
        device_map=device_map("balanced_low_0"),
        max_memory=max_memory("0=1GiB, 1=2GiB,cpu=4GiB"),
        no_split=["model"],
    )
    dm = placement_of(args)
    assert isinstance(dm, DeviceMap) and dm.device_map == "balanced_low_0"
    assert dm.max_memory == {0: 2**30, 1: 2 * 2**30, "cpu": 4 * 2**30} and dm.no_split == ("model",)
    with pytest.raises(argparse.ArgumentTypeError, match="RANK=SIZE"):
        max_memory("0:1GiB")
    with pytest.raises(DistLoadError, match="go with --device-map"):
        placement_of(argparse.Namespace(device_map=None, max_memory={"0": "1GiB"}, no_split=None))
