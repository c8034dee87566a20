"""Synthetic Llama-shaped checkpoints for demos, tests and benchmarks (nothing downloaded).

Writes safetensors shards plus ``model.safetensors.index.json`` the way Hugging Face's
``save_pretrained`` does. Values are deterministic from ``seed``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from distload.locate import INDEX_NAME


@dataclass(frozen=True)
class LlamaShape:
    """Dimensions of a Llama-style decoder (defaults: a tiny one)."""

    vocab: int = 1000
    hidden: int = 64
    intermediate: int = 172
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2

    @staticmethod
    def for_bytes(target: int, dtype_bytes: int = 2) -> LlamaShape:
        """A shape whose parameters take roughly ``target`` bytes (embeddings <= 1/4 of it)."""
        choices = ((128, 2000), (256, 4000), (512, 8000), (1024, 32000), (2048, 32000))
        hidden, vocab = choices[0]
        for h, v in choices:
            if 2 * v * h * dtype_bytes <= target // 4:
                hidden, vocab = h, v
        base = LlamaShape(vocab, hidden, hidden * 11 // 4, 0, 16, 8)
        one = LlamaShape(vocab, hidden, hidden * 11 // 4, 1, 16, 8)
        fixed = checkpoint_bytes(base, dtype_bytes)
        per_layer = checkpoint_bytes(one, dtype_bytes) - fixed
        layers = max(1, round((target - fixed) / per_layer))
        return LlamaShape(vocab, hidden, hidden * 11 // 4, layers, 16, 8)


def attention_tensors(
    prefix: str, hidden: int, q_dim: int, kv_dim: int
) -> dict[str, tuple[int, ...]]:
    """The attention projections of one decoder layer (Llama / Qwen naming), in file order."""
    return {
        f"{prefix}.self_attn.q_proj.weight": (q_dim, hidden),
        f"{prefix}.self_attn.k_proj.weight": (kv_dim, hidden),
        f"{prefix}.self_attn.v_proj.weight": (kv_dim, hidden),
        f"{prefix}.self_attn.o_proj.weight": (hidden, q_dim),
    }


def mlp_tensors(prefix: str, hidden: int, ffn: int) -> dict[str, tuple[int, ...]]:
    """A gated MLP's projections under ``prefix`` (a layer's ``.mlp`` or one expert)."""
    return {
        f"{prefix}.gate_proj.weight": (ffn, hidden),
        f"{prefix}.up_proj.weight": (ffn, hidden),
        f"{prefix}.down_proj.weight": (hidden, ffn),
    }


def llama_tensors(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a Llama-style model."""
    h, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab, h)}
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        out.update(attention_tensors(p, h, h, kv))
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        out.update(mlp_tensors(f"{p}.mlp", h, shape.intermediate))
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (shape.vocab, h)
    return out


def _fill(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        lo, hi = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
        return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def write_checkpoint(
    folder: str | Path,
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    max_shard_bytes: int = 64 * 1024 * 1024,
    seed: int = 0,
    single_file: bool = False,
) -> Path:
    """Write ``tensors`` (name -> (shape, dtype)) as a sharded safetensors checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, (shape, dtype) in tensors.items():
        t = _fill(shape, dtype, gen)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes and not single_file:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if single_file:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return folder


def write_llama(
    folder: str | Path,
    shape: LlamaShape | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 64 * 1024 * 1024,
    seed: int = 0,
) -> Path:
    """Write a Llama-shaped checkpoint in ``dtype`` split into shards."""
    spec = {n: (s, dtype) for n, s in llama_tensors(shape or LlamaShape()).items()}
    return write_checkpoint(folder, spec, max_shard_bytes=max_shard_bytes, seed=seed)


def checkpoint_bytes(shape: LlamaShape, dtype_bytes: int = 2) -> int:
    return sum(math.prod(s) for s in llama_tensors(shape).values()) * dtype_bytes
