"""Placement rules and model shapes shared by the distributed tests."""

from __future__ import annotations

from typing import Any

# a small transformers Llama config (vocab 256, 2 layers, grouped-query attention)
SMALL_LLAMA: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    max_position_embeddings=64,
)

# a small transformers BERT config (an encoder: no head, BertEmbeddings kept whole)
SMALL_BERT: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
)

# tiny Llama shape of the model tests (``tiny_ckpt`` in conftest.py)
SHAPE = dict(vocab=120, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2)

MIXED_RULES: list[list[Any]] = [
    ["model.embed_tokens.weight", ["shard", 0]],
    ["*.q_proj.weight", "colwise"],
    ["*.k_proj.weight", "colwise"],
    ["*.v_proj.weight", "colwise"],
    ["*.o_proj.weight", "rowwise"],
    ["*.gate_proj.weight", "colwise"],
    ["*.up_proj.weight", "colwise"],
    ["*.down_proj.weight", "rowwise"],
    ["model.experts.w1", ["shard", 1]],
    ["model.position_ids", ["shard", 1]],
    ["model.tiny", ["shard", 0]],
    ["model.empty", ["shard", 0]],
    ["*norm*", ["replicate"]],
    ["lm_head.weight", ["shard", -1]],
]
LLAMA_RULES: list[list[Any]] = [
    ["*.q_proj.weight", "colwise"],
    ["*.k_proj.weight", "colwise"],
    ["*.v_proj.weight", "colwise"],
    ["*.o_proj.weight", "rowwise"],
    ["*.gate_proj.weight", "colwise"],
    ["*.up_proj.weight", "colwise"],
    ["*.down_proj.weight", "rowwise"],
    ["model.embed_tokens.weight", "embedding_rowwise"],
]


def tp_rules(json_rules: list[list[Any]]) -> dict[str, Any]:
    """TensorParallel rules from their JSON form (``["shard", dim]`` -> ``Shard(dim)``)."""
    from torch.distributed.tensor import Replicate, Shard

    out: dict[str, Any] = {}
    for pattern, spec in json_rules:
        if isinstance(spec, list):
            out[pattern] = Shard(spec[1]) if spec[0] == "shard" else Replicate()
        else:
            out[pattern] = spec
    return out
