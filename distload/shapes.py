"""Real model families as shapes alone: the index a checkpoint would have, without any file.

``distload plan model:NAME --simulate`` plans and simulates loading a 405B or 671B model on a
laptop from these (:func:`model_index`). Each family lists its tensors in the order
``save_pretrained`` writes them, with the published dimensions:

* :class:`ModelShape`: Llama-family dense decoders (bf16);
* :class:`MoeShape`: Qwen3-MoE (router + routed gated-MLP experts in every layer);
* :class:`DeepseekShape`: DeepSeek-V3 (multi-head latent attention, dense first layers, routed
  and shared experts, one multi-token-prediction layer; fp8 weights with float32 block scales
  ``weight_scale_inv`` as the published checkpoint stores them).

Pure Python, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distload.dtypes import ITEMSIZE
from distload.index import CheckpointIndex, FileMeta, TensorMeta

#: name -> (shape, dtype or None for the index's default dtype)
Shapes = dict[str, tuple[tuple[int, ...], str | None]]


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a Llama-family decoder (enough to know every tensor's shape)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


@dataclass(frozen=True)
class MoeShape:
    """Dimensions of a Qwen3-MoE-family decoder: grouped-query attention with per-head q/k
    norms, and in every layer a router plus ``experts`` gated MLP experts (three tensors each:
    a checkpoint of tens of thousands of tensors)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    expert_ffn: int
    vocab: int


@dataclass(frozen=True)
class DeepseekShape:
    """Dimensions of a DeepSeek-V3-family decoder (``config.json`` names in comments)."""

    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    dense_layers: int  # first_k_dense_replace: layers with a dense MLP instead of experts
    heads: int  # num_attention_heads
    q_lora: int  # q_lora_rank
    kv_lora: int  # kv_lora_rank
    nope_dim: int  # qk_nope_head_dim
    rope_dim: int  # qk_rope_head_dim
    v_dim: int  # v_head_dim
    ffn: int  # intermediate_size (dense layers)
    experts: int  # n_routed_experts
    expert_ffn: int  # moe_intermediate_size
    shared_experts: int  # n_shared_experts (one fused MLP of shared_experts * expert_ffn)
    vocab: int
    mtp_layers: int = 1  # num_nextn_predict_layers: stored after the last layer
    fp8_block: int | None = 128  # weight_block_size of fp8 weights (None: all bf16)


ModelFamily = ModelShape | MoeShape | DeepseekShape

MODELS: dict[str, ModelFamily] = {
    "llama-8b": ModelShape(4096, 14336, 32, 32, 8, 128256),
    "llama-70b": ModelShape(8192, 28672, 80, 64, 8, 128256),
    "llama-405b": ModelShape(16384, 53248, 126, 128, 8, 128256),
    "qwen3-30b-a3b": MoeShape(2048, 48, 32, 4, 128, 128, 768, 151936),
    "qwen3-235b-a22b": MoeShape(4096, 94, 64, 4, 128, 128, 1536, 151936),
    "deepseek-v3": DeepseekShape(
        7168, 61, 3, 128, 1536, 512, 128, 64, 128, 18432, 256, 2048, 1, 129280
    ),
}


def moe_tensors(shape: MoeShape) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Qwen3-MoE checkpoint, in the order ``save_pretrained`` writes."""
    from distload.synthetic import attention_tensors, mlp_tensors

    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab, h)}
    for layer in range(shape.layers):
        p = f"model.layers.{layer}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        out.update(attention_tensors(p, h, q, kv))
        out[f"{p}.self_attn.q_norm.weight"] = (shape.head_dim,)
        out[f"{p}.self_attn.k_norm.weight"] = (shape.head_dim,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        out[f"{p}.mlp.gate.weight"] = (shape.experts, h)
        for e in range(shape.experts):
            out.update(mlp_tensors(f"{p}.mlp.experts.{e}", h, shape.expert_ffn))
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (shape.vocab, h)
    return out


def deepseek_tensors(shape: DeepseekShape) -> Shapes:
    """Names, shapes and dtypes of a DeepSeek-V3 checkpoint as published: projections in fp8
    (``F8_E4M3``), each with its float32 ``weight_scale_inv`` (one scale per
    ``fp8_block`` x ``fp8_block`` block); norms, router, embeddings and heads in bf16."""
    h = shape.hidden
    block = shape.fp8_block
    out: Shapes = {"model.embed_tokens.weight": ((shape.vocab, h), None)}

    def linear(name: str, rows: int, cols: int) -> None:
        if block is None:
            out[f"{name}.weight"] = ((rows, cols), None)
            return
        out[f"{name}.weight"] = ((rows, cols), "F8_E4M3")
        out[f"{name}.weight_scale_inv"] = ((-(-rows // block), -(-cols // block)), "F32")

    def mlp(prefix: str, ffn: int) -> None:
        linear(f"{prefix}.gate_proj", ffn, h)
        linear(f"{prefix}.up_proj", ffn, h)
        linear(f"{prefix}.down_proj", h, ffn)

    def layer(p: str, dense: bool) -> None:
        out[f"{p}.input_layernorm.weight"] = ((h,), None)
        a = f"{p}.self_attn"
        linear(f"{a}.q_a_proj", shape.q_lora, h)
        out[f"{a}.q_a_layernorm.weight"] = ((shape.q_lora,), None)
        linear(f"{a}.q_b_proj", shape.heads * (shape.nope_dim + shape.rope_dim), shape.q_lora)
        linear(f"{a}.kv_a_proj_with_mqa", shape.kv_lora + shape.rope_dim, h)
        out[f"{a}.kv_a_layernorm.weight"] = ((shape.kv_lora,), None)
        linear(f"{a}.kv_b_proj", shape.heads * (shape.nope_dim + shape.v_dim), shape.kv_lora)
        linear(f"{a}.o_proj", h, shape.heads * shape.v_dim)
        out[f"{p}.post_attention_layernorm.weight"] = ((h,), None)
        if dense:
            mlp(f"{p}.mlp", shape.ffn)
            return
        out[f"{p}.mlp.gate.weight"] = ((shape.experts, h), None)
        out[f"{p}.mlp.gate.e_score_correction_bias"] = ((shape.experts,), "F32")
        for e in range(shape.experts):
            mlp(f"{p}.mlp.experts.{e}", shape.expert_ffn)
        mlp(f"{p}.mlp.shared_experts", shape.expert_ffn * shape.shared_experts)

    for i in range(shape.layers):
        layer(f"model.layers.{i}", i < shape.dense_layers)
    for i in range(shape.layers, shape.layers + shape.mtp_layers):
        p = f"model.layers.{i}"  # a multi-token-prediction module: a decoder layer and more
        out[f"{p}.embed_tokens.weight"] = ((shape.vocab, h), None)
        out[f"{p}.enorm.weight"] = ((h,), None)
        out[f"{p}.hnorm.weight"] = ((h,), None)
        out[f"{p}.eh_proj.weight"] = ((h, 2 * h), None)
        layer(p, False)
        out[f"{p}.shared_head.norm.weight"] = ((h,), None)
        out[f"{p}.shared_head.head.weight"] = ((shape.vocab, h), None)
    out["model.norm.weight"] = ((h,), None)
    out["lm_head.weight"] = ((shape.vocab, h), None)
    return out


def family_tensors(shape: ModelFamily) -> Shapes:
    """Every tensor of a model family: name -> (shape, dtype or None for the default)."""
    if isinstance(shape, DeepseekShape):
        return deepseek_tensors(shape)
    if isinstance(shape, MoeShape):
        return {name: (dims, None) for name, dims in moe_tensors(shape).items()}
    from distload.synthetic import LlamaShape, llama_tensors

    llama = LlamaShape(
        shape.vocab, shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads
    )
    return {name: (dims, None) for name, dims in llama_tensors(llama).items()}


def model_index(
    shape: ModelFamily, *, dtype: str = "BF16", shard_bytes: int = 5 * 2**30
) -> CheckpointIndex:
    """The index a ``save_pretrained`` checkpoint of ``shape`` would have (no file needed);
    ``dtype`` is the dtype of tensors whose family does not fix one."""
    shards: list[list[tuple[str, tuple[int, ...], str, int]]] = [[]]
    size = 0
    for name, (dims, own) in family_tensors(shape).items():
        kind = own or dtype
        nbytes = math.prod(dims) * ITEMSIZE[kind]
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims, kind, nbytes))
        size += nbytes
    files, tensors = [], []
    for n, shard in enumerate(shards):
        fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        header = 8 + 128 * len(shard)
        offset = header
        for name, dims, kind, nbytes in shard:
            tensors.append(TensorMeta(name, fname, kind, dims, offset, nbytes))
            offset += nbytes
        files.append(FileMeta(fname, offset, header))
    return CheckpointIndex(f"<{shape}>", tuple(files), tuple(tensors), {"format": "pt"})
