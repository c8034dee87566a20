"""Placement basics: :class:`Layout` (how one tensor lies over the ranks) and its box arithmetic.

A placement maps each :class:`~distload.index.TensorMeta` to a :class:`Layout`. Layouts are
plain data and every function here is pure (no torch, no process group), so the coordinator and
every rank evaluate them identically, and the planner can be tested with integers alone.

Slicing follows ``torch.chunk`` / DTensor semantics: a dim of size ``n`` cut into ``k`` chunks
has chunk size ``ceil(n / k)``; chunk ``i`` covers ``[i * c, min((i + 1) * c, n))``, so trailing
chunks may be smaller or empty.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from distload.index import TensorMeta

#: A rectangular region of a tensor: one ``(start, stop)`` per dim.
Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Layout:
    """How one tensor is laid out over the ranks of the load's group.

    ``holders`` lists the ranks that hold a part (``None``: every rank). The holder at position
    ``p`` of that list holds chunk ``p % chunks`` along ``dim`` (``dim=None``: the whole tensor),
    so consecutive ranks form tensor-parallel groups and further ranks are replicas.
    """

    dim: int | None = None  # sharded dim (non-negative), or None for a full copy
    chunks: int = 1  # number of chunks along ``dim``
    holders: tuple[int, ...] | None = None  # ranks holding a part; None = all ranks
    host: bool = False  # held in host memory ("cpu") instead of the rank's device

    def position(self, rank: int) -> int | None:
        """Position of ``rank`` among the holders, or None if it holds nothing."""
        if self.holders is None:
            return rank
        return self._positions.get(rank)

    @functools.cached_property
    def _positions(self) -> dict[int, int]:
        """Rank -> its first position among the holders (built once per layout object: a
        mesh over hundreds of ranks asks for every piece of every tensor)."""
        found: dict[int, int] = {}
        for pos, rank in enumerate(self.holders or ()):
            found.setdefault(rank, pos)
        return found

    def to_json(self) -> list[object]:
        holders = list(self.holders) if self.holders is not None else None
        return [self.dim, self.chunks, holders, self.host]

    @staticmethod
    def from_json(data: Sequence[object]) -> Layout:
        dim, chunks, holders, host = data
        return Layout(
            dim,  # type: ignore[arg-type]
            chunks,  # type: ignore[arg-type]
            tuple(holders) if holders is not None else None,  # type: ignore[arg-type]
            bool(host),
        )


REPLICATED = Layout()


def chunk_range(size: int, chunks: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``size`` is cut like ``torch.chunk``."""
    step = -(-size // chunks) if size else 0
    start = min(index * step, size)
    return start, min(start + step, size)


def local_box(shape: tuple[int, ...], layout: Layout, rank: int) -> Box | None:
    """Region of the full tensor held by ``rank`` (None if the rank holds no part)."""
    pos = layout.position(rank)
    if pos is None:
        return None
    box = [(0, n) for n in shape]
    if layout.dim is not None:
        box[layout.dim] = chunk_range(shape[layout.dim], layout.chunks, pos % layout.chunks)
    return tuple(box)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def holders(layout: Layout, world_size: int) -> Sequence[int]:
    return range(world_size) if layout.holders is None else layout.holders


@runtime_checkable
class Placement(Protocol):
    """Decides how each tensor is laid out over a group of ``world_size`` ranks.

    Implementations are pure: the same metas and world size give the same layouts on every
    rank (the coordinator evaluates them; any rank could). ``layouts`` sees the whole
    checkpoint at once, so placements can balance by bytes; it returns one layout per tensor,
    in order, and raises :class:`~distload.errors.PlacementError` for a rule that cannot be
    applied (naming the tensor and the rule).
    """

    def layouts(self, tensors: Sequence[TensorMeta], world_size: int) -> list[Layout]: ...

    def describe(self) -> str: ...


class ReplicateAll:
    """Every rank receives every tensor in full (the default placement)."""

    def layouts(self, tensors: Sequence[TensorMeta], world_size: int) -> list[Layout]:
        return [REPLICATED] * len(tensors)

    def describe(self) -> str:
        return "replicate every tensor on every rank"
