"""Placement read from a model whose parameters are already DTensors (parallelised on meta).

A model built on the meta device and parallelised with torch's own APIs (``parallelize_module``
with Colwise/RowwiseParallel, ``fully_shard``) carries, per parameter, a DeviceMesh and
placements. :class:`FromModel` turns them into layouts, so each rank receives exactly its local
shard; tensors that are not DTensors are replicated on every rank.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from distload.errors import PlacementError
from distload.index import TensorMeta
from distload.placement.base import REPLICATED, Layout


class MeshSpec:
    """A DTensor's mesh (group ranks, row-major) and placements, as plain data."""

    def __init__(
        self, shape: tuple[int, ...], ranks: tuple[int, ...], shards: tuple[int | None, ...]
    ):
        self.shape = shape  # mesh shape
        self.ranks = ranks  # group ranks of the mesh, flattened row-major
        self.shards = shards  # per mesh dim: tensor dim sharded over it, or None (replicate)

    def layout(self, name: str, ndim: int) -> Layout:
        sharded = [(k, d) for k, d in enumerate(self.shards) if d is not None]
        if len(sharded) > 1:
            raise PlacementError(
                f"{name}: sharded over {len(sharded)} mesh dims {sharded}; distload loads "
                "DTensors sharded over at most one mesh dim",
                tensor=name,
            )
        if not sharded:
            return Layout(None, 1, self.ranks)
        mesh_dim, dim = sharded[0]
        dim = dim % ndim if ndim else dim
        # order holders with the sharded mesh dim innermost: position % chunks = its coordinate
        order = _move_last(self.shape, mesh_dim)
        return Layout(dim, self.shape[mesh_dim], tuple(self.ranks[i] for i in order))


def _move_last(shape: tuple[int, ...], axis: int) -> list[int]:
    """Flat row-major indices of a mesh, enumerated with ``axis`` as the fastest dim."""
    dims = [d for d in range(len(shape)) if d != axis] + [axis]
    out: list[int] = []

    def walk(level: int, coord: dict[int, int]) -> None:
        if level == len(dims):
            flat = 0
            for d, size in enumerate(shape):
                flat = flat * size + coord[d]
            out.append(flat)
            return
        d = dims[level]
        for i in range(shape[d]):
            coord[d] = i
            walk(level + 1, coord)

    walk(0, {})
    return out


class FromModel:
    """Layouts from per-tensor :class:`MeshSpec` s (see :func:`mesh_specs_of`)."""

    def __init__(self, specs: Mapping[str, MeshSpec]) -> None:
        self.specs = dict(specs)

    def layouts(self, tensors: Sequence[TensorMeta], world_size: int) -> list[Layout]:
        out = []
        for meta in tensors:
            spec = self.specs.get(meta.name)
            out.append(REPLICATED if spec is None else spec.layout(meta.name, len(meta.shape)))
        return out

    def describe(self) -> str:
        return f"from the model's DTensor placements ({len(self.specs)} DTensors)"


def loaded_dtensor() -> ModuleType | None:
    """``torch.distributed.tensor`` if this process has imported it, else None: then no
    DTensor, Shard or Replicate object can exist. Looked up, never imported (importing it
    costs a fresh process about 1.7 s, sympy among its imports). Any rank."""
    return sys.modules.get("torch.distributed.tensor")


def mesh_specs_of(
    named: Mapping[str, object], group_rank_of: dict[int, int] | None
) -> dict[str, MeshSpec]:
    """MeshSpecs of the DTensors among ``named`` tensors; global mesh ranks -> group ranks
    (none without :func:`loaded_dtensor`)."""
    if loaded_dtensor() is None:
        return {}
    from torch.distributed.tensor import DTensor, Replicate, Shard

    specs = {}
    for name, tensor in named.items():
        if not isinstance(tensor, DTensor):
            continue
        mesh, dims = _root_of(tensor.device_mesh)
        ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
        if group_rank_of is not None:
            ranks = [group_rank_of[r] for r in ranks]
        shards: list[int | None] = [None] * mesh.ndim
        for dim, placement in zip(dims, tensor.placements, strict=True):
            if isinstance(placement, Shard):
                shards[dim] = placement.dim
            elif not isinstance(placement, Replicate):
                raise PlacementError(
                    f"{name}: placement {placement} cannot be loaded (only Shard and Replicate)",
                    tensor=name,
                )
        specs[name] = MeshSpec(tuple(mesh.mesh.shape), tuple(ranks), tuple(shards))
    return specs


def _root_of(mesh: Any) -> tuple[Any, list[int]]:
    """The mesh a (sliced) DeviceMesh was cut from, and the dims of it the slice keeps.

    ``mesh["tp"]`` of a ``(dp, tp)`` mesh holds only this rank's replica; its root holds every
    replica, so each rank describes the same layout (the ranks agree on arguments)."""
    get_root = getattr(mesh, "_get_root_mesh", None)
    root = get_root() if get_root is not None else None
    names, root_names = mesh.mesh_dim_names, getattr(root, "mesh_dim_names", None)
    if root is None or root is mesh or not names or not root_names:
        return mesh, list(range(mesh.ndim))
    if not all(n in root_names for n in names):
        return mesh, list(range(mesh.ndim))
    return root, [root_names.index(n) for n in names]
