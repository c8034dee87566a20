"""Pieces and their holders: how the planner cuts stored tensors and groups receiving ranks.

Pure functions of a draft plan (outputs, links, layouts; no buckets yet), run by the
coordinator inside ``distload.planner.make_plan``:

* :func:`split_pieces` cuts a stored tensor into pieces of at most ``bucket_bytes`` along dim 0,
  also at the rows where its owner changes (so one piece of a row-sharded tensor belongs to
  one chunk), or exactly on a manifest's chunk grid;
* :func:`holder_classes` groups the ranks holding part of a tensor by the chunks they hold of
  every output made of it, and :func:`piece_classes` narrows that to one piece: ranks of one
  class receive identical bytes, so a class is packed once (one multicast).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

from distload.geometry import Part, parts_of
from distload.placement.base import Layout, chunk_range, holders
from distload.plan import Item, LoadPlan

Classes = tuple[tuple[int, ...], ...]  # ranks partitioned by what they hold (sorted)


def _row_cuts(plan: LoadPlan, stored: int) -> set[int]:
    """Rows of a stored tensor where pieces should be cut: link edges and dim-0 chunk edges."""
    meta = plan.tensors[stored]
    rows = meta.shape[0]
    cuts = {0, rows}
    for out, link in plan.links_of(stored):
        lo, hi = link.stored_box[0]
        cuts.update((lo, hi))
        layout = plan.layouts[out]
        # the view dim that runs along stored rows (after any stacking dims)
        vdim = link.lead + (1 if link.transposed else 0)
        if layout.dim == vdim:
            size = plan.outputs[out].shape[vdim]
            step = -(-size // layout.chunks)
            v0 = link.view_box[vdim][0]
            for i in range(layout.chunks):
                edge = lo + min(size, i * step) - v0
                if lo <= edge <= hi:
                    cuts.add(edge)
    return cuts


def split_pieces(
    plan: LoadPlan, stored: int, bucket_bytes: int, grid: int | None = None
) -> list[Item]:
    """Cut one stored tensor into pieces along dim 0 (at most ``bucket_bytes`` unless a row is
    bigger), also at the edges where its rows change owner. With ``grid`` (rows per manifest
    chunk), pieces are exactly the chunks of that grid, so each can be hashed as it is read."""
    meta = plan.tensors[stored]
    if meta.nbytes == 0:
        return []
    if not meta.shape:
        return [Item(stored, 0, 1)]
    rows = meta.shape[0]
    if grid is not None:
        return [Item(stored, s, min(rows, s + grid)) for s in range(0, rows, grid)]
    per_piece = max(1, bucket_bytes // max(1, meta.row_bytes))
    if plan.whole_output(stored) is not None:  # one owner region: cut by size only
        return [Item(stored, s, min(rows, s + per_piece)) for s in range(0, rows, per_piece)]
    edges = sorted(_row_cuts(plan, stored))
    items = []
    for lo, hi in itertools.pairwise(edges):
        for start in range(lo, hi, per_piece):
            items.append(Item(stored, start, min(hi, start + per_piece)))
    return items


def chunk_table(layout: Layout, world_size: int) -> list[int]:
    """Per rank: the chunk of a tensor with ``layout`` it holds (0 for a full copy, -1: none)."""
    table = [-1] * world_size
    for pos, rank in enumerate(holders(layout, world_size)):
        table[rank] = pos % layout.chunks if layout.dim is not None else 0
    return table


def holder_classes(
    plan: LoadPlan, stored: int, cache: dict[tuple[Layout, ...], list[list[int]]] | None = None
) -> list[list[int]]:
    """Ranks that hold a part of stored tensor ``stored``, grouped by the chunks they hold of
    every output made of it: ranks of one group hold exactly the same regions (e.g. the
    data-parallel replicas of one tensor-parallel rank), so geometry is computed once per
    group instead of once per rank.

    The grouping depends only on the layouts of those outputs, so ``cache`` keeps it per
    combination of layouts across calls: a checkpoint of tens of thousands of tensors with a
    handful of distinct layouts walks the ranks a handful of times, not once per tensor. The
    returned lists are shared with the cache: read them, do not change them."""
    key = tuple(plan.layouts[out] for out, _link in plan.links_of(stored))
    if cache is not None and key in cache:
        return cache[key]
    columns = [chunk_table(layout, plan.world_size) for layout in dict.fromkeys(key)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank, chunks in enumerate(zip(*columns, strict=True)):
        if any(k >= 0 for k in chunks):
            groups.setdefault(chunks, []).append(rank)
    found = list(groups.values())
    if cache is not None:
        cache[key] = found
    return found


def _whole_copies(plan: LoadPlan, stored: int) -> bool:
    """Whether every output made of stored tensor ``stored`` is the whole tensor, held in full
    by its holders (the common case of a replicated tensor without key transforms)."""
    meta = plan.tensors[stored]
    if meta.nbytes > 0 and plan.whole_output(stored) is not None:
        return True  # the common case, known per plan without building boxes
    full = tuple((0, n) for n in meta.shape)
    return meta.nbytes > 0 and all(
        plan.layouts[out].dim is None and link.stored_box == full and not link.transposed
        for out, link in plan.links_of(stored)
    )


@dataclass
class ChunkClasses:
    """The holder classes of a tensor sharded as stored, with the chunk each holds along the
    sharded dim (kept per (layout, size): tensors of one shape share it)."""

    ranges: list[tuple[tuple[int, ...], int, int]]  # (holder class, chunk start, stop), sorted
    by_rows: dict[tuple[int, int], Classes] = field(default_factory=dict)  # dim 0: per rows

    @functools.cached_property
    def nonempty(self) -> Classes:
        """Every class with a non-empty chunk (sharded along another dim than 0)."""
        return tuple(r for r, lo, hi in self.ranges if lo < hi)

    def of_rows(self, start: int, stop: int) -> Classes:
        """Classes whose chunk of rows meets ``[start, stop)`` (sharded along dim 0)."""
        got = self.by_rows.get((start, stop))
        if got is None:
            got = tuple(r for r, lo, hi in self.ranges if max(lo, start) < min(hi, stop))
            self.by_rows[(start, stop)] = got
        return got


def piece_classes(
    plan: LoadPlan,
    item: Item,
    holding: list[list[int]],
    chunks: dict[tuple[Layout, int], ChunkClasses] | None = None,
) -> Classes:
    """The ranks holding a part of piece ``item``, partitioned by identical parts (from the
    tensor's :func:`holder_classes`): sorted classes of sorted ranks. ``chunks`` keeps the
    chunk each holder class holds per (layout, size) across calls."""
    if len(holding) == 1 and _whole_copies(plan, item.tensor):
        return (tuple(holding[0]),)  # every holder holds the whole piece: no geometry needed
    same = plan.identity_output(item.tensor)
    layout = plan.layouts[same] if same is not None else None
    if layout is not None and layout.dim is not None:
        # sharded as stored: each holder class holds one chunk along the sharded dim, and
        # distinct non-empty chunks are distinct parts; a class takes part when its chunk is
        # not empty and, sharded along rows, meets the piece's rows (no boxes needed)
        size = plan.tensors[item.tensor].shape[layout.dim]
        key = (layout, size)
        known = chunks.get(key) if chunks is not None else None
        if known is None:
            chunk_of = chunk_table(layout, plan.world_size)
            ranges = []
            for ranks in holding:
                lo, hi = chunk_range(size, layout.chunks, chunk_of[ranks[0]])
                ranges.append((tuple(ranks), lo, hi))
            ranges.sort()
            known = ChunkClasses(ranges)
            if chunks is not None:
                chunks[key] = known
        if layout.dim == 0:
            return known.of_rows(item.start, item.stop)
        return known.nonempty
    by_parts: dict[tuple[Part, ...], list[int]] = {}
    for ranks in holding:
        parts = tuple(parts_of(plan, ranks[0], item))
        if parts:
            by_parts.setdefault(parts, []).extend(ranks)
    return tuple(sorted(tuple(sorted(ranks)) for ranks in by_parts.values()))
