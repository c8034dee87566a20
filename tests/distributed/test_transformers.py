"""Parity with transformers: small real models from configs (random weights, several shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.cases import SMALL_LLAMA
from tests.distributed.launch import check_all_ok, run_group

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.timeout(300)

LLAMA = SMALL_LLAMA
MISTRAL = dict(LLAMA, num_key_value_heads=2, sliding_window=None)
MISTRAL_KV4 = dict(MISTRAL, num_key_value_heads=4)
GPT2 = dict(
    vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
)


def _save(kind: str, cfg: dict[str, Any], folder: Path) -> Path:
    config = transformers.AutoConfig.for_model(kind, **cfg)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, max_shard_size="60KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "llama": _save("llama", LLAMA, tmp_path_factory.mktemp("llama")),
        "mistral": _save("mistral", MISTRAL, tmp_path_factory.mktemp("mistral")),
        "mistral_kv4": _save("mistral", MISTRAL_KV4, tmp_path_factory.mktemp("mistral4")),
        "gpt2": _save("gpt2", GPT2, tmp_path_factory.mktemp("gpt2")),
    }


@pytest.mark.parametrize(
    ("name", "world"), [("llama", 2), ("llama", 4), ("mistral", 2), ("mistral_kv4", 4)]
)
def test_tensor_parallel_logits_match_from_pretrained(
    name: str, world: int, ckpts: dict[str, Path]
) -> None:
    # grouped-query attention: kv heads must split evenly over the TP ranks
    cfg = {"llama": LLAMA, "mistral": MISTRAL, "mistral_kv4": MISTRAL_KV4}[name]
    kind = name.split("_", maxsplit=1)[0]
    args = {"kind": kind, "config": cfg, "source": str(ckpts[name])}
    results = check_all_ok(
        run_group(world, "hf_tensor_parallel", args, scenarios="tests.distributed.hf_scenarios")
    )
    assert sum(results[0]["read"]) == results[0]["total"]
    assert max(r["err"] for r in results) <= 1e-5


def test_gpt2_two_stage_pipeline_is_exact(ckpts: dict[str, Path]) -> None:
    args = {"kind": "gpt2", "config": GPT2, "source": str(ckpts["gpt2"])}
    results = check_all_ok(
        run_group(2, "hf_pipeline", args, scenarios="tests.distributed.hf_scenarios")
    )
    assert {r["stage"] for r in results} == {0, 1}


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_llama_family_two_stage_pipeline(name: str, ckpts: dict[str, Path]) -> None:
    cfg = LLAMA if name == "llama" else MISTRAL
    args = {"kind": name, "config": cfg, "source": str(ckpts[name])}
    results = check_all_ok(
        run_group(2, "hf_llama_pipeline", args, scenarios="tests.distributed.hf_scenarios")
    )
    assert results[1]["err"] == 0.0  # no reduction in a pipeline: bit-identical logits


def test_device_map_bit_for_bit(ckpts: dict[str, Path]) -> None:
    args = {"kind": "llama", "config": LLAMA, "source": str(ckpts["llama"])}
    results = check_all_ok(
        run_group(2, "hf_device_map", args, scenarios="tests.distributed.hf_scenarios")
    )
    assert sum(results[0]["read"]) == results[0]["total"]
    assert not set(results[0]["held"]) & set(results[1]["held"])
    assert results[0]["held"] and results[1]["held"]


@pytest.mark.parametrize("world", [2, 4])
def test_gpt2_fused_attention_under_tp(world: int, ckpts: dict[str, Path]) -> None:
    args = {"config": GPT2, "source": str(ckpts["gpt2"])}
    results = check_all_ok(
        run_group(world, "hf_gpt2_tp", args, scenarios="tests.distributed.hf_scenarios")
    )
    assert sum(results[0]["read"]) == results[0]["total"]


QWEN3_MOE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=8,
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=False,
    max_position_embeddings=64,
)
MIXTRAL = dict(LLAMA, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def moe_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """transformers models with fused expert parameters, saved in the Hub's per-expert format."""
    out = {
        "qwen3_moe": _save("qwen3_moe", QWEN3_MOE, tmp_path_factory.mktemp("qwen3moe")),
        "mixtral": _save("mixtral", MIXTRAL, tmp_path_factory.mktemp("mixtral")),
    }
    import json

    for kind, expert in (("qwen3_moe", ".mlp.experts.7."), ("mixtral", ".experts.3.w1")):
        names = json.loads((out[kind] / "model.safetensors.index.json").read_text())["weight_map"]
        assert any(expert in n for n in names), kind  # one tensor per expert on disk
    return out


@pytest.mark.parametrize(
    ("kind", "tp", "world"),
    [("qwen3_moe", False, 2), ("qwen3_moe", True, 2), ("mixtral", False, 2), ("mixtral", True, 4)],
)
def test_fused_experts_load_into_transformers_moe(
    kind: str, tp: bool, world: int, moe_ckpts: dict[str, Path]
) -> None:
    """Per-expert checkpoints into fused expert parameters (transformers' MoE modules) with
    the `<family>_fused` preset: bit for bit, every byte read once, logits equal
    from_pretrained's; under TP each rank holds a block of whole experts."""
    cfg = QWEN3_MOE if kind == "qwen3_moe" else MIXTRAL
    args = {
        "kind": kind,
        "config": cfg,
        "source": str(moe_ckpts[kind]),
        "preset": f"{kind}_fused",
        "tp": tp,
    }
    results = check_all_ok(
        run_group(world, "hf_fused_moe", args, scenarios="tests.distributed.hf_scenarios")
    )
    assert sum(results[0]["read"]) == results[0]["total"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in results[0]["experts"]
    assert max(r["err"] for r in results) <= 1e-5


def test_expert_parallel_dtensors_in_a_fused_moe_model(moe_ckpts: dict[str, Path]) -> None:
    """Fused expert parameters as DTensors sharded on the expert dim (expert parallel over 2
    ranks): each rank loads only its experts' bytes and keeps DTensors."""
    args = {"kind": "qwen3_moe", "config": QWEN3_MOE, "source": str(moe_ckpts["qwen3_moe"])}
    results = check_all_ok(
        run_group(2, "hf_fused_moe_dtensor", args, scenarios="tests.distributed.hf_scenarios")
    )
    first = results[0]
    assert sum(first["read"]) == first["total"]
    assert len(first["sharded"]) == 2 * QWEN3_MOE["num_hidden_layers"]
    # each rank holds everything but the other rank's half of the experts
    assert first["held"] == [first["total"] - first["expert_bytes"] // 2] * 2
