"""Views and links: what key transforms produce, from the checkpoint's metadata alone.

A :class:`View` is a tensor the caller receives, made of :class:`Link` s ("this box of that
stored tensor fills this box of the view, possibly transposed"); :func:`apply_transforms` runs
the transforms of ``distload.transforms.ops`` over the identity views of an index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from distload.derived import Beside
from distload.errors import PlacementError
from distload.index import CheckpointIndex

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Link:
    """A box of a stored tensor that fills a box of a view (same size, maybe transposed).

    A view made by :class:`Stack` has more dims than its stored tensors: ``view_box`` then
    starts with one extra ``(index, index + 1)`` entry per stacking (its *lead*), and the
    remaining entries correspond to ``stored_box`` (swapped when ``transposed``)."""

    stored: int  # index into the checkpoint's tensors
    stored_box: Box  # region of the stored tensor
    view_box: Box  # region of the view it fills
    transposed: bool = False  # view region = stored region transposed (its last 2 dims)

    @property
    def lead(self) -> int:
        """Number of leading view dims that stacking added (0 for most links)."""
        return len(self.view_box) - len(self.stored_box)


@dataclass(frozen=True)
class View:
    """A tensor as the caller receives it, assembled from stored regions."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # stored dtype (all links share it)
    links: tuple[Link, ...]


class Transform(Protocol):
    """Maps a list of views to a new list of views (pure)."""

    def apply(self, views: list[View]) -> list[View]: ...


def _views_of(index: CheckpointIndex) -> tuple[View, ...]:
    full = [tuple((0, n) for n in t.shape) for t in index.tensors]
    return tuple(
        View(t.name, t.shape, t.dtype, (Link(i, full[i], full[i]),))
        for i, t in enumerate(index.tensors)
    )


# every stored tensor as a view of itself (before any transform): views are immutable, so
# they are built once per index object (the coordinator asks more than once), kept beside it
_identity_views = Beside(_views_of)


def identity_views(index: CheckpointIndex) -> list[View]:
    """Every stored tensor as a view of itself, as a new list."""
    return list(_identity_views(index))


def apply_transforms(index: CheckpointIndex, transforms: Sequence[Transform]) -> list[View]:
    """The views after applying ``transforms`` in order; checks names stay unique."""
    views = identity_views(index)
    for transform in transforms:
        views = transform.apply(views)
        seen: set[str] = set()
        for v in views:
            if v.name in seen:
                raise PlacementError(
                    f"{transform!r} produced the name {v.name!r} twice", tensor=v.name
                )
            seen.add(v.name)
    return views


# --------------------------------------------------------------------------------------------
# box arithmetic


def clip(link: Link, dim: int, lo: int, hi: int) -> Link | None:
    """The part of ``link`` whose view coordinate along ``dim`` lies in [lo, hi)."""
    a, b = link.view_box[dim]
    a2, b2 = max(a, lo), min(b, hi)
    if a2 >= b2:
        return None
    view = list(link.view_box)
    view[dim] = (a2, b2)
    lead = link.lead
    if dim < lead:  # a stacking dim (extent 1): the link is kept whole
        return replace(link, view_box=tuple(view))
    sdim = dim - lead
    if link.transposed:
        sdim = 1 - sdim
    s0 = link.stored_box[sdim][0]
    stored = list(link.stored_box)
    stored[sdim] = (s0 + a2 - a, s0 + b2 - a)
    return replace(link, stored_box=tuple(stored), view_box=tuple(view))


def shift(link: Link, dim: int, delta: int) -> Link:
    view = list(link.view_box)
    a, b = view[dim]
    view[dim] = (a + delta, b + delta)
    return replace(link, view_box=tuple(view))


class Suffix:
    """Matches names ending with a suffix."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def match(self, name: str) -> str | None:
        """The prefix before the suffix, if ``name`` matches."""
        if name.endswith(self.suffix):
            return name[: len(name) - len(self.suffix)]
        return None
