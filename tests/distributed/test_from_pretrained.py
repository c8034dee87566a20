"""``distload.from_pretrained``: transformers' own models in one call, tensor parallel with
the model's own plan or replicated, the same outputs as transformers' from_pretrained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.cases import SMALL_BERT, SMALL_LLAMA
from tests.distributed.launch import check_all_ok, run_group

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.timeout(300)

SMALL = SMALL_LLAMA
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("llama", "LlamaForCausalLM", dict(SMALL, tie_word_embeddings=False)),
    "qwen2-tied": ("qwen2", "Qwen2ForCausalLM", dict(SMALL, tie_word_embeddings=True)),
    "gpt2": (
        "gpt2",
        "GPT2LMHeadModel",
        dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    ),
    "bert": ("bert", "BertModel", SMALL_BERT),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model saved by transformers itself (several shards, with its config)."""
    out = {}
    for name, (kind, cls, cfg) in MODELS.items():
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(kind, **cfg)
        config.architectures = [cls]
        model = getattr(transformers, cls)(config)
        model.save_pretrained(folder, max_shard_size="60KB")
        out[name] = folder
    return out


@pytest.mark.parametrize(
    ("name", "world", "tp_plan", "dtype"),
    [
        ("llama", 2, "auto", "float32"),
        ("llama", 4, "auto", "float32"),
        ("llama", 2, "auto", "bfloat16"),
        ("llama", 2, "preset:llama", "float32"),
        ("qwen2-tied", 2, "preset:qwen2", "float32"),
        ("qwen2-tied", 2, "auto", "float32"),
        ("qwen2-tied", 4, "auto", "bfloat16"),
        ("gpt2", 2, None, "float32"),
        ("bert", 2, None, "float32"),
    ],
)
def test_same_outputs_as_transformers(
    name: str, world: int, tp_plan: str | None, dtype: str, saved: dict[str, Path]
) -> None:
    _kind, cls, cfg = MODELS[name]
    args = {
        "source": str(saved[name]),
        "class": cls,
        "tp_plan": tp_plan,
        "dtype": dtype,
        "vocab": cfg["vocab_size"],
    }
    results = check_all_ok(
        run_group(world, "hf_from_pretrained", args, scenarios="tests.distributed.hf_scenarios")
    )
    limit = 1e-5 if dtype == "float32" else 3e-2  # DTensor reductions add in another order
    assert max(r["err"] for r in results) <= limit, results
    assert sum(results[0]["read"]) == results[0]["total"]  # each byte read once per job
    if tp_plan is not None:
        assert all(r["dtensors"] > 0 for r in results)
    if name == "qwen2-tied":
        assert all(r["tied"] for r in results)


def test_auto_plan_of_a_model_without_one_is_refused(saved: dict[str, Path]) -> None:
    args = {"source": str(saved["gpt2"]), "tp_plan": "auto"}
    results = check_all_ok(
        run_group(2, "hf_from_pretrained_error", args, scenarios="tests.distributed.hf_scenarios")
    )
    for r in results:
        assert "has no tensor-parallel plan" in r["message"], r


@pytest.mark.parametrize(
    ("name", "device_map", "max_memory"),
    [
        ("qwen2-tied", "auto", None),
        ("bert", "auto", None),
        ("llama", "balanced_low_0", None),
        ("llama", "auto", {"0": "60KB", "1": "60KB"}),
    ],
)
def test_device_maps_of_the_model_tree(
    name: str, device_map: str, max_memory: dict[str, str] | None, saved: dict[str, Path]
) -> None:
    args = {"source": str(saved[name]), "device_map": device_map, "max_memory": max_memory}
    results = check_all_ok(
        run_group(
            2 if device_map == "auto" else 3,
            "hf_from_pretrained_device_map",
            args,
            scenarios="tests.distributed.hf_scenarios",
        )
    )
    mapping = results[0]["map"]
    assert all(r["map"] == mapping for r in results)  # the same map on every rank
    assert sum(results[0]["read"]) == results[0]["total"]  # each byte read once per job
    if name == "bert":  # BertEmbeddings whole, on one rank
        assert "embeddings" in mapping and "embeddings.word_embeddings" not in mapping
    if name == "qwen2-tied":  # the tied head's rank holds the embedding too
        assert mapping["lm_head"] == 1 and "lm_head.weight" in results[1]["held"]
    if device_map == "balanced_low_0":
        assert 0 not in mapping.values() and not results[0]["held"]
    if max_memory is not None:  # offload keeps the model's order
        order = list(mapping.values())
        assert "cpu" in order and all(t == "cpu" for t in order[order.index("cpu") :])
