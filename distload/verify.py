"""Check loaded pieces against single-process safetensors reads (``distload load --verify``).

Runs on every rank independently (no communication): each rank re-reads, with safetensors'
own ``get_slice``, exactly the slice it holds and compares the bytes.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open

from distload.dtypes import to_torch
from distload.placement.base import local_box
from distload.plan import LoadPlan


def verify_against_safetensors(
    plan: LoadPlan, state: dict[str, torch.Tensor], rank: int
) -> list[str]:
    """Names of tensors whose local piece differs from the safetensors slice (empty: all equal)."""
    bad: list[str] = []
    handles: dict[str, object] = {}
    try:
        for t, meta in enumerate(plan.tensors):
            box = local_box(meta.shape, plan.layouts[t], rank)
            if box is None or meta.name not in state:
                continue
            if meta.file not in handles:
                path = os.path.join(plan.index.root, meta.file)
                handles[meta.file] = safe_open(path, "pt")
            fh = handles[meta.file]
            if meta.shape:
                expected = fh.get_slice(meta.name)[tuple(slice(a, b) for a, b in box)]  # type: ignore[attr-defined]
            else:
                expected = fh.get_tensor(meta.name)  # type: ignore[attr-defined]
            expected = expected.to(to_torch(plan.dtypes[t]))
            got = state[meta.name].detach().to("cpu")
            if got.dtype != expected.dtype:
                expected = expected.to(got.dtype)
            if got.shape != expected.shape or not torch.equal(
                got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)
            ):
                bad.append(meta.name)
    finally:
        handles.clear()
    return bad
