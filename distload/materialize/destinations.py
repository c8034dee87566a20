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
        extra = sorted(set(out) - planned)
        if extra:
            raise DistLoadError(
                f"out= on rank {rank} names {len(extra)} tensor(s) that this rank does not "
                f"receive (not in the checkpoint, or not placed here): {extra[:5]}",
                tensor=extra[0],
            )
    return dests
