"""Destinations of ``distload.load``: allocate each rank's local tensors, or check ``out=``.

Runs on every rank after the plan arrives; failures are shared by the caller through
:func:`~distload.coordination.agree`, so a shape mismatch on one rank ends the load on all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from distload.dtypes import to_torch
from distload.errors import DistLoadError
from distload.materialize.dtensor import check_dtensor_shapes
from distload.plan import LoadPlan


@dataclass(frozen=True)
class Tie:
    """Two out= names given the very same tensor (a tie the caller declares, e.g. tied
    embeddings): the second is loaded into ``scratch`` and must equal the first, bit for bit."""

    first: int  # output index loaded into the caller's tensor
    second: int  # output index loaded into ``scratch``
    scratch: torch.Tensor


@dataclass
class Destinations:
    """Where this rank's outputs land: ``tensors`` (what the executor writes into) and the
    ties to check once every byte has arrived."""

    tensors: dict[int, torch.Tensor]
    ties: list[Tie] = field(default_factory=list)
    returned: dict[int, torch.Tensor] = field(default_factory=dict)  # output -> caller's tensor

    def check_ties(self, plan: LoadPlan, rank: int) -> None:
        """Every declared tie holds identical bytes in the checkpoint, or a DistLoadError."""
        for tie in self.ties:
            a, b = self.tensors[tie.first], tie.scratch
            if not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                first, second = plan.outputs[tie.first].name, plan.outputs[tie.second].name
                raise DistLoadError(
                    f"out[{first!r}] and out[{second!r}] on rank {rank} are one tensor (a tie), "
                    "but the checkpoint holds different bytes for them: pass them as two "
                    "tensors, or one of the names",
                    tensor=second,
                )

    def result(self) -> dict[int, torch.Tensor]:
        """Output -> the tensor the caller gets back (ties: the caller's own tensor)."""
        return {t: self.returned.get(t, d) for t, d in self.tensors.items()}


def _memory_key(t: torch.Tensor) -> tuple[object, ...]:
    """Equal for two tensors exactly when they are the same memory seen the same way."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device))


def untie(dests: dict[int, torch.Tensor]) -> Destinations:
    """Destinations where outputs given one and the same tensor load the second (and later)
    into scratch tensors, to be checked against the first (:meth:`Destinations.check_ties`)."""
    result = Destinations(dict(dests))
    seen: dict[tuple[object, ...], int] = {}  # memory -> the first output given it
    for t, dest in sorted(dests.items()):
        if dest.numel() == 0:
            continue  # empty tensors hold no bytes to share
        first = seen.setdefault(_memory_key(dest), t)
        if first == t:
            continue
        scratch = torch.empty_like(dest)
        result.tensors[t] = scratch
        result.returned[t] = dest
        result.ties.append(Tie(first, t, scratch))
    return result


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


def destinations(
    plan: LoadPlan,
    rank: int,
    device: torch.device,
    out: Mapping[str, torch.Tensor] | None,
    dtensors: Mapping[str, torch.Tensor],
) -> Destinations:
    """:func:`prepare_destinations`, ties untied; ``out=`` DTensors come as their local
    tensors in ``out`` and as themselves in ``dtensors``: their global shapes are checked and
    the caller gets them back."""
    result = untie(prepare_destinations(plan, rank, device, out))
    if dtensors:
        check_dtensor_shapes(dtensors, plan, rank)
        position = {o.name: t for t, o in enumerate(plan.outputs)}
        for name, tensor in dtensors.items():
            if name in position and position[name] in result.tensors:
                result.returned.setdefault(position[name], tensor)
    return result


def _extent(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte address a tensor's elements can touch."""
    span = sum((n - 1) * abs(st) for n, st in zip(tensor.shape, tensor.stride(), strict=True))
    start = tensor.data_ptr()
    return start, start + (span + 1) * tensor.element_size()


def check_separate(out: Mapping[str, torch.Tensor], rank: int) -> None:
    """Refuse ``out=`` tensors that are not tensors, or that share part of their memory: one
    would end up holding the other's bytes. The very same tensor under two names is a tie
    (tied embeddings): allowed, and checked to hold identical bytes (:func:`untie`)."""
    spans = []
    seen: set[tuple[object, ...]] = set()
    for name, tensor in out.items():
        if not isinstance(tensor, torch.Tensor):
            raise DistLoadError(
                f"out[{name!r}] on rank {rank} is {type(tensor).__name__}, not a torch.Tensor",
                tensor=name,
            )
        key = _memory_key(tensor)
        if key in seen:
            continue  # the same tensor under two names: a tie, checked after loading
        seen.add(key)
        if tensor.numel() and not tensor.is_meta:
            spans.append((*_extent(tensor), tensor.device, name))
    spans.sort(key=lambda s: (str(s[2]), s[0]))
    reach: tuple[int, object, str] | None = None  # furthest end so far, its device and name
    for start, end, device, name in spans:
        if reach is not None and reach[1] == device and start < reach[0]:
            raise DistLoadError(
                f"out[{reach[2]!r}] and out[{name!r}] on rank {rank} share memory (their "
                f"bytes overlap or interleave at {start:#x}): each out= tensor needs memory "
                "of its own (one tensor under two names is a tie: it must hold identical "
                "bytes for both)",
                tensor=name,
            )
        if reach is None or reach[1] != device or end > reach[0]:
            reach = (end, device, name)
