"""Destinations of ``distload.load``: allocate each rank's local tensors, or check ``out=``.

Runs on every rank after the plan arrives; failures are shared by the caller through
:func:`~distload.coordination.agree`, so a shape mismatch on one rank ends the load on all.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from distload.dtypes import to_torch
from distload.errors import DistLoadError
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
        check_separate(out, rank)
        extra = sorted(set(out) - planned)
        if extra:
            raise DistLoadError(
                f"out= on rank {rank} names {len(extra)} tensor(s) that this rank does not "
                f"receive (not in the checkpoint, or not placed here): {extra[:5]}",
                tensor=extra[0],
            )
    return dests


def _extent(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte address a tensor's elements can touch."""
    span = sum((n - 1) * abs(st) for n, st in zip(tensor.shape, tensor.stride(), strict=True))
    start = tensor.data_ptr()
    return start, start + (span + 1) * tensor.element_size()


def check_separate(out: Mapping[str, torch.Tensor], rank: int) -> None:
    """Refuse ``out=`` tensors that are not tensors, or that share memory: one would end up
    holding the other's bytes. (Tied weights: pass one of the names; ``load_into`` ties
    them itself.)"""
    spans = []
    for name, tensor in out.items():
        if not isinstance(tensor, torch.Tensor):
            raise DistLoadError(
                f"out[{name!r}] on rank {rank} is {type(tensor).__name__}, not a torch.Tensor",
                tensor=name,
            )
        if tensor.numel() and not tensor.is_meta:
            spans.append((*_extent(tensor), tensor.device, name))
    spans.sort(key=lambda s: (str(s[2]), s[0]))
    reach: tuple[int, object, str] | None = None  # furthest end so far, its device and name
    for start, end, device, name in spans:
        if reach is not None and reach[1] == device and start < reach[0]:
            raise DistLoadError(
                f"out[{reach[2]!r}] and out[{name!r}] on rank {rank} share memory (their "
                f"bytes overlap or interleave at {start:#x}): each out= tensor needs memory "
                "of its own; for tied weights pass one of the names",
                tensor=name,
            )
        if reach is None or reach[1] != device or end > reach[0]:
            reach = (end, device, name)
