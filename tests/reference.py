"""Test references, independent of distload's own code: checkpoints and expected slices.

Expected pieces are computed from single-process safetensors reads with ``torch.chunk``
semantics written out here, so a bug in distload's layout arithmetic cannot hide itself.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from distload.synthetic import LlamaShape, llama_tensors, write_checkpoint


def mixed_spec() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """A Llama-shaped model with odd shapes plus fp32, int, bool, 0-d, empty and 3-d tensors."""
    shape = LlamaShape(vocab=517, hidden=48, intermediate=131, layers=3, heads=4, kv_heads=2)
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        n: (s, torch.bfloat16) for n, s in llama_tensors(shape).items()
    }
    spec["model.layers.0.input_layernorm.weight"] = ((48,), torch.float32)
    spec["model.norm.weight"] = ((48,), torch.float32)
    spec["model.layers.1.mlp.gate_proj.weight"] = ((131, 48), torch.float32)
    spec["model.rotary.inv_freq"] = ((12,), torch.float32)
    spec["model.position_ids"] = ((1, 37), torch.int64)
    spec["model.layers.2.attn_mask"] = ((5, 7), torch.bool)
    spec["model.step"] = ((), torch.int32)
    spec["model.scale"] = ((), torch.float16)
    spec["model.empty"] = ((0, 8), torch.bfloat16)
    spec["model.experts.w1"] = ((3, 10, 9), torch.bfloat16)
    spec["model.tiny"] = ((3,), torch.bfloat16)
    return spec


def make_mixed_checkpoint(folder: Path, *, max_shard_bytes: int = 40_000) -> Path:
    return write_checkpoint(folder, mixed_spec(), max_shard_bytes=max_shard_bytes, seed=7)


def read_all(source: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read single-process with safetensors."""
    path = Path(source)
    if path.is_file():
        files = {path.name: None}
        root = path.parent
    elif (path / "model.safetensors.index.json").exists():
        wm = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        files = dict.fromkeys(wm.values())
        root = path
    else:
        files = {"model.safetensors": None}
        root = path
    out = {}
    for fname in files:
        with safe_open(str(root / fname), "pt") as fh:
            for name in fh.keys():
                out[name] = fh.get_tensor(name)
    return out


def chunk(full: torch.Tensor, dim: int, k: int, i: int) -> torch.Tensor:
    """Chunk ``i`` of ``k`` along ``dim`` with torch.chunk/DTensor semantics (may be empty)."""
    n = full.shape[dim]
    step = -(-n // k)
    start = min(i * step, n)
    stop = min(start + step, n)
    return full.narrow(dim, start, stop - start)


def rule_dim(rules: list[list[Any]], name: str, ndim: int) -> int | None:
    """Shard dim for ``name`` under JSON rules [[pattern, spec], ...] (None: replicated)."""
    for pattern, rule in rules:
        if fnmatch.fnmatchcase(name, pattern):
            parts = name.split(".")
            embedding = ndim == 2 and len(parts) > 1 and "embed" in parts[-2]
            spec = rule
            if rule in ("colwise", "rowwise") and embedding:  # torch's styles on nn.Embedding
                spec = "embedding_colwise" if rule == "colwise" else "embedding_rowwise"
            if spec in ("colwise", "colwise_gather_output", "embedding_rowwise"):
                return 0
            if spec == "embedding_colwise":
                return 1
            if spec == "rowwise":
                return ndim - 1 if ndim >= 2 else None
            if spec == "replicate" or spec[0] == "replicate":
                return None
            return spec[1] % ndim  # ["shard", dim]
    return None


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def expected_local(
    full: torch.Tensor,
    name: str,
    rules: list[list[Any]],
    tp: int,
    rank: int,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    t = full
    if dtype is not None and t.dtype.is_floating_point:
        t = t.to(dtype)
    dim = rule_dim(rules, name, t.dim()) if t.dim() else None
    if dim is None or tp == 1:
        return t
    return chunk(t, dim, tp, rank % tp)
