"""Check loaded pieces against single-process safetensors reads (``distload load --verify``).

Runs on every rank independently (no communication): each rank rebuilds, from safetensors' own
``get_slice`` reads of the stored regions, exactly the pieces it holds (applying the plan's key
transforms) and compares the bytes.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors import safe_open

from distload.dtypes import to_torch
from distload.placement.base import local_box
from distload.plan import LoadPlan


def _slices(box: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def verify_against_safetensors(
    plan: LoadPlan,
    state: dict[str, torch.Tensor],
    rank: int,
    root: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Names of tensors whose local piece differs from the safetensors slice (empty: all equal).

    ``root``: the folder holding the checkpoint's files on this rank (default: the plan's;
    for a Hub source, the commit's snapshot in this rank's cache).
    """
    folder = os.fspath(root) if root is not None else plan.index.root
    bad: list[str] = []
    handles: dict[str, Any] = {}

    def stored_region(stored: int, box: tuple[tuple[int, int], ...]) -> torch.Tensor:
        meta = plan.tensors[stored]
        if meta.file not in handles:
            handles[meta.file] = safe_open(os.path.join(folder, meta.file), "pt")
        fh = handles[meta.file]
        return fh.get_slice(meta.name)[_slices(box)] if meta.shape else fh.get_tensor(meta.name)

    links: dict[int, list[Any]] = {}
    for out, link in plan.links:
        links.setdefault(out, []).append(link)
    for t, output in enumerate(plan.outputs):
        box = local_box(output.shape, plan.layouts[t], rank)
        if box is None or output.name not in state:
            continue
        full = torch.empty(output.shape, dtype=to_torch(output.stored_dtype))
        for link in links.get(t, []):
            region = stored_region(link.stored, link.stored_box)
            if link.transposed:
                region = region.t()
            if output.shape:
                full[_slices(link.view_box)] = region
            else:
                full = region.clone()
        expected = full[_slices(box)] if output.shape else full
        expected = expected.to(to_torch(plan.dtypes[t]))
        got = state[output.name].detach().to("cpu")
        if got.dtype != expected.dtype:
            expected = expected.to(got.dtype)
        if got.shape != expected.shape or not torch.equal(
            got.reshape(-1).view(torch.uint8), expected.contiguous().reshape(-1).view(torch.uint8)
        ):
            bad.append(output.name)
    handles.clear()
    return bad
