"""Tensor-parallel presets for common Hugging Face model families (extensible registry).

A preset is TP rules plus, where the checkpoint layout needs it, key transforms: GPT-2 stores
Conv1D weights as ``(in, out)`` and a fused ``c_attn``; its preset transposes them to Linear
orientation and splits ``c_attn`` into ``q``/``k``/``v`` so each can be sharded by heads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distload.errors import PlacementError
from distload.transforms import Merge, Rename, Split, Stack, Transform, Transpose


@dataclass(frozen=True)
class Preset:
    """TP rules (fnmatch pattern -> placement) and the key transforms they assume."""

    rules: dict[str, Any]
    transforms: tuple[Transform, ...] = field(default=())


_LLAMA: dict[str, Any] = {
    "model.embed_tokens.weight": "embedding_rowwise",
    "*.self_attn.q_proj.*": "colwise",
    "*.self_attn.k_proj.*": "colwise",
    "*.self_attn.v_proj.*": "colwise",
    "*.self_attn.o_proj.weight": "rowwise",
    "*.mlp.gate_proj.*": "colwise",
    "*.mlp.up_proj.*": "colwise",
    "*.mlp.down_proj.weight": "rowwise",
    "lm_head.weight": "colwise_gather_output",
}

_MIXTRAL: dict[str, Any] = {
    **{k: v for k, v in _LLAMA.items() if ".mlp." not in k},
    "*.block_sparse_moe.experts.*.w1.weight": "colwise",
    "*.block_sparse_moe.experts.*.w3.weight": "colwise",
    "*.block_sparse_moe.experts.*.w2.weight": "rowwise",
    "*.block_sparse_moe.gate.weight": "replicate",
}

# Qwen3-MoE (and Qwen2-MoE without its shared expert): each expert sharded like a Llama MLP
_QWEN3_MOE: dict[str, Any] = {
    **{k: v for k, v in _LLAMA.items() if ".mlp." not in k},
    "*.mlp.experts.*.gate_proj.weight": "colwise",
    "*.mlp.experts.*.up_proj.weight": "colwise",
    "*.mlp.experts.*.down_proj.weight": "rowwise",
    "*.mlp.gate.weight": "replicate",
}

# DeepSeek-V3 (multi-head latent attention): the low-rank down projections (q_a, kv_a) stay
# whole, the per-head up projections are cut by heads, o_proj by its input; dense MLPs, routed
# and shared experts like a Llama MLP. Each fp8 weight's block scales (``weight_scale_inv``,
# one per 128 x 128 block) are cut on the same dim, so a rank's scales match its weight rows
# wherever a TP rank's share is a whole number of blocks (TP 8 and 16 for V3's shapes).
_DEEPSEEK_V3: dict[str, Any] = {
    "model.embed_tokens.weight": "embedding_rowwise",
    "*.self_attn.q_b_proj.*": "colwise",
    "*.self_attn.kv_b_proj.*": "colwise",
    "*.self_attn.o_proj.*": "rowwise",
    "*.mlp.gate.*": "replicate",
    "*.gate_proj.*": "colwise",
    "*.up_proj.*": "colwise",
    "*.down_proj.*": "rowwise",
    "lm_head.weight": "colwise_gather_output",
}


def fused_experts(
    container: str = ".mlp.experts",
    *,
    gate: str = "gate_proj",
    up: str = "up_proj",
    down: str = "down_proj",
    suffix: str = ".weight",
) -> list[Transform]:
    """Key transforms from a mixture-of-experts checkpoint's per-expert weights to the fused
    expert parameters of transformers' MoE models (Qwen2/3-MoE, DeepSeek-V3, OLMoE, ...):

    * ``<container>.<e>.<gate>.weight`` and ``...<up>.weight`` (``ffn x hidden`` each) ->
      ``<container>.gate_up_proj`` (``experts x 2*ffn x hidden``: each expert's gate rows,
      then its up rows);
    * ``<container>.<e>.<down>.weight`` -> ``<container>.down_proj`` (``experts x hidden x
      ffn``).

    Metadata only: every rank reads the bytes of the experts it holds once, straight from
    their per-expert tensors. Mixtral's checkpoints name them ``block_sparse_moe.experts.<e>
    .w1/w3/w2``: ``[Rename(r"\\.block_sparse_moe\\.", ".mlp."), *fused_experts(gate="w1",
    up="w3", down="w2")]`` (the ``mixtral_fused`` preset).
    """
    where = re.escape(container)

    def stack(name: str, into: str) -> Stack:
        return Stack(rf"{where}\.(\d+)\.{re.escape(name + suffix)}$", f"{container}.{into}")

    return [
        stack(gate, gate),
        stack(up, up),
        Merge([f"{container}.{gate}", f"{container}.{up}"], f"{container}.gate_up_proj", dim=1),
        stack(down, "down_proj"),
    ]


# fused experts (transformers' MoE models) under a TP group: attention as Llama's, the
# stacked experts cut on their expert dim (dim 0: contiguous blocks of whole experts per
# rank, i.e. expert parallel over the group), the router whole. Their gate_up_proj cannot be
# cut by rows: each half holds one projection, so chunks of it would not pair gate with up.
_FUSED_MOE: dict[str, Any] = {
    **{k: v for k, v in _LLAMA.items() if ".mlp." not in k},
    "*.mlp.experts.gate_up_proj": "colwise",
    "*.mlp.experts.down_proj": "colwise",
    "*.mlp.gate.weight": "replicate",
}

_GPT2_TRANSFORMS: tuple[Transform, ...] = (
    Transpose(".attn.c_attn.weight"),
    Transpose(".attn.c_proj.weight"),
    Transpose(".mlp.c_fc.weight"),
    Transpose(".mlp.c_proj.weight"),
    Split(".attn.c_attn.weight", [".attn.q.weight", ".attn.k.weight", ".attn.v.weight"]),
    Split(".attn.c_attn.bias", [".attn.q.bias", ".attn.k.bias", ".attn.v.bias"]),
)
_GPT2: dict[str, Any] = {
    "transformer.wte.weight": "embedding_rowwise",
    "*.attn.q.*": "colwise",
    "*.attn.k.*": "colwise",
    "*.attn.v.*": "colwise",
    "*.attn.c_proj.weight": "rowwise",
    "*.mlp.c_fc.*": "colwise",
    "*.mlp.c_proj.weight": "rowwise",
}

_REGISTRY: dict[str, Preset] = {
    "llama": Preset(_LLAMA),
    "mistral": Preset(_LLAMA),
    "qwen2": Preset({**_LLAMA, "*.self_attn.[qkv]_proj.bias": "colwise"}),
    "mixtral": Preset(_MIXTRAL),
    "qwen3_moe": Preset(_QWEN3_MOE),
    "deepseek_v3": Preset(_DEEPSEEK_V3),
    "qwen3_moe_fused": Preset(_FUSED_MOE, tuple(fused_experts())),
    "mixtral_fused": Preset(
        _FUSED_MOE,
        (Rename(r"\.block_sparse_moe\.", ".mlp."), *fused_experts(gate="w1", up="w3", down="w2")),
    ),
    "gpt2": Preset(_GPT2, _GPT2_TRANSFORMS),
}


def register_preset(
    name: str, rules: Mapping[str, Any], transforms: Sequence[Transform] = ()
) -> None:
    """Add or replace a named preset (usable as ``TensorParallel(preset(name))``)."""
    _REGISTRY[name] = Preset(dict(rules), tuple(transforms))


def _get(name: str) -> Preset:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PlacementError(f"unknown preset {name!r}; valid: {sorted(_REGISTRY)}") from None


def preset(name: str) -> dict[str, Any]:
    """The TP rules of a model family, e.g. ``TensorParallel(preset("llama"))``."""
    return dict(_get(name).rules)


def preset_transforms(name: str) -> list[Transform]:
    """The key transforms a preset's rules assume (pass as ``transforms=``); often empty."""
    return list(_get(name).transforms)


def presets() -> list[str]:
    return sorted(_REGISTRY)
