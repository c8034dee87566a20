"""Tensor-parallel rule presets for common Hugging Face model families (extensible registry)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distload.errors import PlacementError

_LLAMA: dict[str, Any] = {
    "model.embed_tokens.weight": "colwise",
    "*.self_attn.q_proj.*": "colwise",
    "*.self_attn.k_proj.*": "colwise",
    "*.self_attn.v_proj.*": "colwise",
    "*.self_attn.o_proj.weight": "rowwise",
    "*.mlp.gate_proj.*": "colwise",
    "*.mlp.up_proj.*": "colwise",
    "*.mlp.down_proj.weight": "rowwise",
    "lm_head.weight": "colwise",
}

_REGISTRY: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}


def register_preset(name: str, rules: Mapping[str, Any]) -> None:
    """Add or replace a named rule set (usable as ``TensorParallel(preset(name))``)."""
    _REGISTRY[name] = dict(rules)


def preset(name: str) -> dict[str, Any]:
    """The TP rules of a model family, e.g. ``preset("llama")``."""
    try:
        return dict(_REGISTRY[name])
    except KeyError:
        raise PlacementError(f"unknown preset {name!r}; valid: {sorted(_REGISTRY)}") from None


def presets() -> list[str]:
    return sorted(_REGISTRY)
