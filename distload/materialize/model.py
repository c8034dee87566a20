"""Loading into a model built on the meta device: its slots, its ties, and the binding.

Runs on every rank after ``distload.load`` returned this rank's pieces: each piece *becomes*
the model's parameter or buffer (no random init, no second copy); tied weights share one
Parameter; DTensor parameters stay DTensors with their mesh and placements.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from distload.errors import DistLoadError
from distload.materialize.dtensor import as_dtensor_like, is_dtensor
from distload.placement.expert import EXPERT_PATTERN
from distload.plan import LoadPlan


@dataclass
class Entry:
    """One parameter or buffer slot of a model (a tied tensor has several slots)."""

    module: torch.nn.Module
    attr: str
    tensor: torch.Tensor  # the current (usually meta) tensor
    is_param: bool
    persistent: bool  # buffers only: part of the state dict


def model_entries(model: torch.nn.Module) -> dict[str, Entry]:
    """Every parameter and buffer slot of ``model`` by its state-dict name (ties included)."""
    entries: dict[str, Entry] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, param in module._parameters.items():
            if param is not None:
                entries[prefix + attr] = Entry(module, attr, param, True, True)
        for attr, buf in module._buffers.items():
            if buf is not None:
                persistent = attr not in module._non_persistent_buffers_set
                entries[prefix + attr] = Entry(module, attr, buf, False, persistent)
    return entries


def declared_ties(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(target, source) ties a Hugging Face model declares but may not have applied yet.

    transformers models list them in ``_tied_weights_keys`` (a ``{target: source}`` dict, per
    sub-model) and apply them only when ``config.tie_word_embeddings`` is set.
    """
    ties: list[tuple[str, str]] = []
    for mod_name, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None)
        config = getattr(module, "config", None)
        if not isinstance(keys, dict) or not getattr(config, "tie_word_embeddings", True):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        ties.extend((prefix + t, prefix + s) for t, s in keys.items())
    return ties


def tie_groups(
    entries: Mapping[str, Entry],
    extra: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> list[list[str]]:
    """Names sharing one tensor (tied weights), in model order; ``extra`` adds declared ties."""
    groups: dict[int, list[str]] = {}
    for name, entry in entries.items():
        groups.setdefault(id(entry.tensor), []).append(name)
    for target, source in extra:
        if target in entries and source in entries:
            a, b = id(entries[source].tensor), id(entries[target].tensor)
            if a != b and b in groups:
                groups[a].extend(groups.pop(b))
    return list(groups.values())


def assign(entries: Mapping[str, Entry], names: list[str], value: torch.Tensor) -> None:
    """Put ``value`` into every slot of one tie group (one Parameter object for all)."""
    first = entries[names[0]]
    if first.is_param:
        new: torch.Tensor = torch.nn.Parameter(value, requires_grad=first.tensor.requires_grad)
    else:
        new = value
    for name in names:
        entry = entries[name]
        if entry.is_param:
            entry.module._parameters[entry.attr] = new  # type: ignore[assignment]
        else:
            entry.module._buffers[entry.attr] = new
        entry.tensor = new


def bind(
    entries: Mapping[str, Entry],
    groups: list[list[str]],
    plan: LoadPlan,
    loaded: Mapping[str, torch.Tensor],
) -> list[str]:
    """Make this rank's loaded pieces the model's tensors, one tie group at a time; returns
    the model names the checkpoint does not hold (their slots are left as they are).

    Tensors placed on other ranks (pipeline stages, device maps) stay on meta here; model
    tensors that are DTensors keep their mesh and placements.
    """
    position = {t.name: i for i, t in enumerate(plan.outputs)}
    missing: list[str] = []
    for names in groups:
        source = next((n for n in names if n in position), None)
        if source is None:
            entry = entries[names[0]]
            if entry.is_param or entry.persistent:
                missing.extend(names)
            continue
        value = loaded.get(source)
        if value is None:  # placed on other ranks: stays meta here
            continue
        like = entries[names[0]].tensor
        out = position[source]
        stored = plan.outputs[out].shape
        if like.is_meta and tuple(like.shape) != tuple(stored):
            raise DistLoadError(
                f"model tensor {names[0]!r} has shape {list(like.shape)} but the checkpoint's "
                f"{source!r} has {list(stored)}",
                tensor=names[0],
            )
        if is_dtensor(like):
            value = as_dtensor_like(value, like)
        assign(entries, names, value)
    return missing


def check_bound(
    entries: Mapping[str, Entry],
    missing: Sequence[str],
    *,
    strict: bool,
    source: object,
    skipped: Sequence[str],
) -> None:
    """After :func:`bind`: meta buffers nobody fills are an error; missing parameters are
    one too under ``strict`` (with a hint when the checkpoint holds experts one by one)."""
    stale = sorted(
        n for n, e in entries.items() if not e.is_param and not e.persistent and e.tensor.is_meta
    )
    if stale:
        raise DistLoadError(
            f"{len(stale)} non-persistent buffer(s) are on the meta device and not in the "
            f"checkpoint: {stale[:5]}; build the model with accelerate.init_empty_weights() "
            "(which keeps buffers real) or initialise them before loading",
            tensor=stale[0],
        )
    if missing and strict:
        raise DistLoadError(
            f"checkpoint {source} lacks {len(missing)} tensor(s) of the model: {list(missing[:8])}"
            f" (pass strict=False to load the rest){fused_hint(missing, skipped)}"
            f"{prefix_hint(missing, skipped)}",
            tensor=missing[0],
        )


def prefix_hint(missing: Sequence[str], skipped: Sequence[str]) -> str:
    """Advice when the model's names and the checkpoint's differ by a base-model prefix (a
    ``BertModel`` checkpoint loaded into ``BertForSequenceClassification``, or the reverse):
    transformers maps that prefix itself; here a ``Rename`` does."""
    unused, wanted = set(skipped), set(missing)
    for name in missing[:64]:
        head, _, rest = name.partition(".")
        if rest in unused:
            return (
                f"; the checkpoint's names lack the model's prefix {head!r} (e.g. {rest!r} for "
                f"{name!r}): pass transforms=[distload.Rename(r'^', '{head}.')]"
            )
    for name in skipped[:64]:
        head, _, rest = name.partition(".")
        if rest in wanted:
            return (
                f"; the checkpoint's names carry a prefix {head!r} the model lacks (e.g. "
                f"{name!r} for {rest!r}): pass transforms=[distload.Rename(r'^{head}\\.', '')]"
            )
    return ""


def fused_hint(missing: Sequence[str], skipped: Sequence[str]) -> str:
    """Advice when the model holds fused expert parameters and the checkpoint has one tensor
    per expert (transformers' MoE models and the Hub's checkpoints of them)."""
    fused = any(n.endswith((".experts.gate_up_proj", ".experts.down_proj")) for n in missing)
    if fused and any(re.search(EXPERT_PATTERN, n) for n in skipped):
        return (
            "; the model holds fused expert parameters (experts.gate_up_proj / down_proj) and "
            "the checkpoint one tensor per expert: pass transforms=distload.fused_experts() "
            "(Mixtral: distload.preset_transforms('mixtral_fused'))"
        )
    return ""
