"""DTensors in and out: wrap local pieces as DTensors with a model's or a TP layout's mesh.

Runs on every rank of the load; building a mesh (:func:`tp_mesh`) is collective.
"""

from __future__ import annotations

from typing import Any

import torch

from distload.errors import DistLoadError
from distload.placement.base import Layout


def is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def as_dtensor_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Wrap a local shard as a DTensor with the mesh, placements and global shape of ``like``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        raise TypeError(f"expected a DTensor to copy the layout of, got {type(like).__name__}")
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
