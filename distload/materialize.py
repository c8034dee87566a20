"""Destinations: allocate each rank's local tensors, or check the caller's ``out=`` tensors.

Runs on every rank after the plan arrives; failures are shared by the caller through
:func:`~distload.coordination.agree`, so a shape mismatch on one rank ends the load on all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from distload.dtypes import to_torch
from distload.errors import DistLoadError
from distload.placement.base import Layout
from distload.plan import LoadPlan


def prepare_destinations(
    plan: LoadPlan,
    rank: int,
    device: torch.device,
    out: Mapping[str, torch.Tensor] | None,
) -> dict[int, torch.Tensor]:
    """Destination tensor per tensor index that ``rank`` holds a part of.

    With ``out``, the caller's tensors are used as they are (never reallocated): each must have
    the rank's local shape; its dtype may differ (values are cast on copy, as
    ``load_state_dict`` does). Without ``out``, tensors are allocated on ``device`` with the
    plan's destination dtype (uninitialised; every byte is written by the load).
    """
    dests: dict[int, torch.Tensor] = {}
    planned: set[str] = set()
    for t, meta in enumerate(plan.outputs):
        shape = plan.local_shape(t, rank)
        if shape is None:
            continue
        planned.add(meta.name)
        if out is None:
            where = torch.device("cpu") if plan.layouts[t].host else device
            dests[t] = torch.empty(shape, dtype=to_torch(plan.dtypes[t]), device=where)
            continue
        if meta.name not in out:
            raise DistLoadError(
                f"out= on rank {rank} has no tensor {meta.name!r}, which this rank must receive "
                f"(local shape {list(shape)})",
                tensor=meta.name,
            )
        dest = out[meta.name]
        if tuple(dest.shape) != shape:
            raise DistLoadError(
                f"out[{meta.name!r}] on rank {rank} has shape {list(dest.shape)}, expected the "
                f"local shape {list(shape)} (full shape {list(meta.shape)}, placement "
                f"{plan.layouts[t].to_json()})",
                tensor=meta.name,
            )
        if dest.is_meta:
            raise DistLoadError(
                f"out[{meta.name!r}] is on the meta device; it must be real memory",
                tensor=meta.name,
            )
        dests[t] = dest
    if out is not None:
        extra = sorted(set(out) - planned)
        if extra:
            raise DistLoadError(
                f"out= on rank {rank} names {len(extra)} tensor(s) that this rank does not "
                f"receive (not in the checkpoint, or not placed here): {extra[:5]}",
                tensor=extra[0],
            )
    return dests


# --------------------------------------------------------------------------------------------
# models built on the meta device


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


def as_dtensor_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Wrap a local shard as a DTensor with the mesh, placements and global shape of ``like``."""
    from torch.distributed.tensor import DTensor

    assert isinstance(like, DTensor)
    return DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def tp_mesh(device_type: str, world: int, tp: int) -> Any:
    """A (dp, tp) DeviceMesh over the world (collective: every rank calls it, same order)."""
    from torch.distributed.device_mesh import init_device_mesh

    if world % tp:
        raise DistLoadError(f"world_size({world}) % tp({tp}) = {world % tp}")
    if world // tp > 1:
        return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return init_device_mesh(device_type, (tp,), mesh_dim_names=("tp",))


def dtensor_from_layout(
    local: torch.Tensor, mesh: Any, layout: Layout, shape: tuple[int, ...]
) -> Any:
    """Wrap a local piece as a DTensor on a ``tp_mesh`` following its TP layout."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    inner = Shard(layout.dim) if layout.dim is not None else Replicate()
    placements = [Replicate(), inner] if mesh.ndim == 2 else [inner]
    stride = []
    acc = 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return DTensor.from_local(
        local,
        mesh,
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=tuple(reversed(stride)),
    )
