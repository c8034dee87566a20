"""The planner: placement + checkpoint index -> :class:`~distload.plan.LoadPlan`.

Pure Python, run by the coordinator only; it never imports torch.distributed, so it is tested
with plain integers for the world size and used offline by ``distload plan``.

Steps:

1. evaluate the placement for every tensor (a :class:`~distload.placement.base.Layout`);
2. cut tensors into pieces of at most ``bucket_bytes`` along dim 0, also at dim-0 shard
   boundaries so that a piece of a row-sharded tensor belongs to one chunk;
3. classify each piece: needed by one rank only -> that rank reads it itself (``local``); needed
   in full by every rank -> ``broadcast``; anything else -> ``p2p`` (each rank gets its part),
   with the receivers partitioned into classes of ranks holding identical parts (computed once
   per class, see :func:`holder_classes`; a class of several ranks is one multicast);
4. group consecutive pieces of one kind (and one partition) into buckets of at most
   ``bucket_bytes`` and give each bucket to the reader with the fewest bytes so far, so every
   byte is read by exactly one rank and reading is balanced over all nodes' storage; a p2p
   bucket goes to one of its own receivers where one may read it (local pieces count towards
   their reader's share first). Each class's root is put first (the reader, or a member on
   its node);
5. order the buckets round robin over groups with the same receivers (:func:`interleave`), so
   buckets of disjoint ranks follow each other and run concurrently (``distload.execute``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from distload.checkpoint import CheckpointIndex, TensorMeta
from distload.dtypes import FLOATING, ITEMSIZE
from distload.errors import PlacementError
from distload.geometry import Part, parts_of, piece_bytes, read_bytes, receiving_classes
from distload.manifest import Digests
from distload.placement.base import (
    Layout,
    Placement,
    ReplicateAll,
    box_shape,
    chunk_range,
    holders,
    local_box,
)
from distload.plan import Bucket, BucketKind, Item, LoadPlan, Output
from distload.transforms import Transform, apply_transforms

# one bucket's bytes. Smaller buckets hold less staging memory (touched afresh by every load:
# on the 2-core benchmark machine the first touch of a page costs more than copying into it)
# and pipeline reads, copies and transfers more finely. Measured with `distload bench`
# (1.5 GB, cold): 16 MiB against 51 MiB buckets, tp2 0.67-0.71 vs 0.69-0.89 s, tp4 0.85-0.91
# vs 0.72-1.13 s, 2 nodes 0.68-0.70 vs 0.81-0.96 s; with a warm page cache tp4 0.30-0.33
# vs 0.35-0.47 s (8 MiB: no better; 4 MiB: slower). The simulator's predictions for 70B and
# 405B meshes move by under 4 % between 16 and 64 MiB.
DEFAULT_BUCKET_BYTES = 16 * 1024 * 1024


def destination_dtypes(stored: Sequence[str], dtype: str | None) -> tuple[str, ...]:
    """Destination dtype per output: ``dtype`` for floating tensors, stored dtype otherwise."""
    if dtype is None:
        return tuple(stored)
    if dtype not in FLOATING:
        raise PlacementError(f"cast target must be a floating dtype, got {dtype}")
    return tuple(dtype if d in FLOATING else d for d in stored)


def evaluate_layouts(
    tensors: Sequence[TensorMeta], placement: Placement, world_size: int
) -> tuple[Layout, ...]:
    """Run the placement on every output tensor, checking what it returns."""
    layouts = placement.layouts(tensors, world_size)
    if len(layouts) != len(tensors):
        raise PlacementError(
            f"placement returned {len(layouts)} layouts for {len(tensors)} tensors"
        )
    valid: set[Layout] = set()  # holders checked once per distinct layout
    for meta, layout in zip(tensors, layouts, strict=True):
        if layout.holders is not None and layout not in valid:
            if not all(0 <= r < world_size for r in layout.holders):
                raise PlacementError(
                    f"placement put tensor {meta.name!r} on ranks {list(layout.holders)}, "
                    f"outside the group of {world_size}",
                    tensor=meta.name,
                )
            valid.add(layout)
        if layout.dim is not None and not (0 <= layout.dim < len(meta.shape)):
            raise PlacementError(
                f"placement shards dim {layout.dim} of tensor {meta.name!r} with shape "
                f"{list(meta.shape)}",
                tensor=meta.name,
            )
    return tuple(layouts)


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


Classes = tuple[tuple[int, ...], ...]  # ranks partitioned by what they hold (sorted)


def _chunk_table(layout: Layout, world_size: int) -> list[int]:
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
    columns = [_chunk_table(layout, plan.world_size) for layout in dict.fromkeys(key)]
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
            chunk_of = _chunk_table(layout, plan.world_size)
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


def _rooted(members: tuple[int, ...], reader: int, nodes: Sequence[int]) -> tuple[int, ...]:
    """A class with its root first: the reader if a member, else the first member on the
    reader's node (the hop from the reader stays inside the node), else the first member."""
    if reader in members:
        root = reader
    else:
        near = [r for r in members if nodes and nodes[r] == nodes[reader]]
        root = near[0] if near else members[0]
    return (root, *(r for r in members if r != root))


@dataclass
class _Open:
    items: list[Item] = field(default_factory=list)
    nbytes: int = 0


def make_plan(
    index: CheckpointIndex,
    world_size: int,
    placement: Placement | None = None,
    *,
    dtype: str | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    readers: Collection[int] | None = None,
    names: Collection[str] | None = None,
    transforms: Sequence[Transform] = (),
    nodes: Sequence[int] = (),
    digests: Mapping[int, Digests] | None = None,
    file_readers: Mapping[str, Collection[int]] | None = None,
) -> LoadPlan:
    """Build the plan for loading ``index`` into a group of ``world_size`` ranks.

    Args:
        placement: layout rule per output tensor (default: replicate everything).
        dtype: destination dtype for floating tensors (None keeps the stored dtype).
        bucket_bytes: bound on one bucket's bytes (staging buffers are a few of these).
        readers: ranks allowed to read from storage (default: all).
        names: load only these output tensors (default: all).
        transforms: key transforms (rename, split, merge, transpose) applied to the
            checkpoint's tensors first; placements and ``names`` see the transformed names.
        nodes: node index of every rank (from ``runtime.topology``), kept in the plan.
        digests: manifest chunk hashes per stored tensor (``distload.manifest``): pieces
            follow the manifest's chunk grid and readers check each one as they read it.
        file_readers: file -> ranks allowed to read it (within ``readers``); e.g. the ranks
            whose Hub cache holds that shard. Files not named may be read by any reader.
    """
    if world_size < 1:
        raise PlacementError(f"world_size must be >= 1, got {world_size}")
    if bucket_bytes < 1:
        raise PlacementError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    placement = placement or ReplicateAll()
    views = apply_transforms(index, transforms)
    skipped: tuple[str, ...] = ()
    if names is not None:
        wanted = set(names)
        skipped = tuple(v.name for v in views if v.name not in wanted)
        views = [v for v in views if v.name in wanted]
    reader_set = sorted(set(range(world_size) if readers is None else readers))
    if not reader_set or not all(0 <= r < world_size for r in reader_set):
        raise PlacementError(f"readers {reader_set} must be non-empty ranks of 0..{world_size - 1}")
    output_metas = [
        TensorMeta(v.name, "", v.dtype, v.shape, 0, math.prod(v.shape) * ITEMSIZE[v.dtype])
        for v in views
    ]
    layouts = evaluate_layouts(output_metas, placement, world_size)
    dtypes = destination_dtypes([v.dtype for v in views], dtype)
    outputs = tuple(Output(v.name, v.shape, v.dtype) for v in views)
    links = tuple((o, link) for o, v in enumerate(views) for link in v.links)
    skeleton = LoadPlan(
        world_size, bucket_bytes, index, outputs, links, layouts, dtypes, (), "", skipped
    )

    everyone = tuple(reader_set)
    allowed_by_file: dict[str, tuple[int, ...]] = {}
    for file, ranks in (file_readers or {}).items():
        allowed_by_file[file] = tuple(r for r in everyone if r in set(ranks))
        if not allowed_by_file[file]:
            raise PlacementError(
                f"file {file!r} may be read by ranks {sorted(ranks)}, none of them a reader "
                f"({everyone})",
                file=file,
            )
    load = dict.fromkeys(reader_set, 0)
    ordered: list[tuple[int, Bucket]] = []  # (position of last piece, bucket)
    local_open: dict[int, _Open] = {}
    # shared buckets by kind, by the readers allowed for their files and by their receiver
    # classes (pieces of one bucket split their receivers the same way)
    shared_open: dict[tuple[BucketKind, tuple[int, ...], Classes], _Open] = {}
    position = 0
    holder_cache: dict[tuple[Layout, ...], list[list[int]]] = {}
    chunk_cache: dict[tuple[Layout, int], ChunkClasses] = {}
    # (kind, pool, classes) -> ranks that may read such a bucket (the same for every bucket)
    near_cache: dict[tuple[BucketKind, tuple[int, ...], Classes], tuple[int, ...]] = {}
    rooted_cache: dict[tuple[Classes, int], Classes] = {}  # (classes, reader) -> rooted

    def close(
        kind: BucketKind,
        reader: int | None,
        bucket: _Open,
        pool: tuple[int, ...],
        classes: Classes = (),
    ) -> None:
        if not bucket.items:
            return
        if reader is None:
            # a p2p bucket is read by one of its receivers where one may read it: its bytes
            # then start where they are needed, and buckets of disjoint receivers (pipeline
            # stages) involve disjoint ranks, so they move at the same time
            candidates = near_cache.get((kind, pool, classes))
            if candidates is None:
                holding = {r for c in classes for r in c}
                near = tuple(r for r in pool if r in holding) if kind == "p2p" else ()
                candidates = near or pool
                near_cache[(kind, pool, classes)] = candidates
            reader = min(candidates, key=lambda r: (load[r], r))
        load[reader] += bucket.nbytes
        rooted = rooted_cache.get((classes, reader))
        if rooted is None:
            rooted = tuple(_rooted(c, reader, nodes) for c in classes)
            rooted_cache[(classes, reader)] = rooted
        ordered.append((position, Bucket(kind, reader, tuple(bucket.items), rooted)))
        bucket.items, bucket.nbytes = [], 0

    used = sorted({link.stored for _, link in links})
    for t in used:
        meta = index.tensors[t]
        pool = allowed_by_file.get(meta.file, everyone)
        grid = digests[t].rows_per_chunk if digests and t in digests else None
        holding = holder_classes(skeleton, t, holder_cache)
        for item in split_pieces(skeleton, t, bucket_bytes, grid):
            position += 1
            nbytes = piece_bytes(meta, item)
            classes = piece_classes(skeleton, item, holding, chunk_cache)
            if not classes:
                continue
            key: tuple[BucketKind, tuple[int, ...], Classes]
            if len(classes) == 1 and len(classes[0]) == 1 and classes[0][0] in pool:
                kind: BucketKind = "local"
                bucket = local_open.setdefault(classes[0][0], _Open())
            elif len(classes) == 1 and len(classes[0]) == world_size:
                # every rank holds the same regions: one broadcast serves all
                kind = "broadcast"
                key = (kind, pool, ())
                bucket = shared_open.setdefault(key, _Open())
            else:
                kind = "p2p"
                key = (kind, pool, classes)
                bucket = shared_open.setdefault(key, _Open())
            if bucket.items and bucket.nbytes + nbytes > bucket_bytes:
                if kind == "local":
                    close(kind, classes[0][0], bucket, pool)
                else:
                    close(kind, None, bucket, pool, key[2])
            bucket.items.append(item)
            bucket.nbytes += nbytes
    for (kind, pool, classes), bucket in shared_open.items():
        close(kind, None, bucket, pool, classes)
    for rank, bucket in sorted(local_open.items()):
        close("local", rank, bucket, everyone)
    ordered.sort(key=lambda pb: pb[0])
    buckets = interleave([b for _, b in ordered], world_size)
    return LoadPlan(
        world_size,
        bucket_bytes,
        index,
        outputs,
        links,
        layouts,
        dtypes,
        buckets,
        placement.describe(),
        skipped,
        tuple(nodes),
        tuple(
            (t, d.rows_per_chunk, d.chunks)
            for t, d in sorted((digests or {}).items())
            if t in set(used)
        ),
    )


def interleave(buckets: list[Bucket], world_size: int) -> tuple[Bucket, ...]:
    """The global order: groups of buckets with the same receivers interleaved (each group
    keeps its own order and is spread evenly over the whole), so that consecutive buckets involve
    disjoint ranks where the placement allows (pipeline stages, replica groups) and move at
    the same time. Plans whose shared buckets all reach the same ranks (tensor parallel over
    the whole group) keep the file order."""

    if len({b.receivers(world_size) for b in buckets if b.kind != "local"}) < 2:
        return tuple(buckets)
    groups: dict[frozenset[int], list[Bucket]] = {}
    for b in buckets:
        groups.setdefault(b.receivers(world_size), []).append(b)
    # each group spread evenly over the whole order (its i-th of n buckets at (i + 1/2) / n),
    # so long and short groups both run to the end and no reader is left alone at the tail
    keyed = [
        ((i + 0.5) / len(g), order, i, b)
        for order, g in enumerate(groups.values())
        for i, b in enumerate(g)
    ]
    keyed.sort(key=lambda entry: entry[:3])
    return tuple(entry[3] for entry in keyed)


# --------------------------------------------------------------------------------------------
# accounting


@dataclass(frozen=True)
class RankTraffic:
    """Bytes one rank reads, sends, receives and finally holds under a plan."""

    rank: int
    read: int
    sent: int
    received: int
    held: int
    staging: int  # largest staging buffer this rank needs, in bytes


def traffic(plan: LoadPlan, *, multicast: bool = True) -> list[RankTraffic]:
    """Per-rank byte accounting of a plan (what ``distload plan`` prints).

    With ``multicast`` a class of several receivers is served as the executor does when the
    transport opened its group: the reader sends its bytes once (to the class's root, or
    within the class when it is a member itself) and the root sends one copy to every other
    member, as a broadcast inside the class does logically. Without, the reader sends to
    every member (shared memory, or a transport without sub-groups).
    """
    world = plan.world_size
    read, sent, recv, staging = [0] * world, [0] * world, [0] * world, [0] * world
    for bucket in plan.buckets:
        size = read_bytes(plan, bucket)
        read[bucket.reader] += sum(piece_bytes(plan.tensors[i.tensor], i) for i in bucket.items)
        staging[bucket.reader] = max(staging[bucket.reader], size)
        for members, nbytes in receiving_classes(plan, bucket):
            if multicast or bucket.kind == "broadcast":
                root = members[0]
                if root != bucket.reader:
                    sent[bucket.reader] += nbytes
                sent[root] += nbytes * (len(members) - 1)
            else:
                sent[bucket.reader] += nbytes * sum(1 for r in members if r != bucket.reader)
            for rank in members:
                if rank == bucket.reader:
                    continue
                recv[rank] += nbytes
                staging[rank] = max(staging[rank], nbytes)
    # held: bytes per chunk summed over the outputs of each layout, then spread over the
    # ranks once per layout (not once per output and rank)
    per_chunk: dict[Layout, list[int]] = {}
    for out, output in enumerate(plan.outputs):
        layout = plan.layouts[out]
        sums = per_chunk.setdefault(layout, [0] * layout.chunks)
        itemsize = ITEMSIZE[plan.dtypes[out]]
        ranks = holders(layout, world)
        for chunk in range(min(len(ranks), layout.chunks if layout.dim is not None else 1)):
            box = local_box(output.shape, layout, ranks[chunk])
            assert box is not None
            sums[chunk] += math.prod(box_shape(box)) * itemsize
    held = [0] * world
    for layout, sums in per_chunk.items():
        for rank, chunk in enumerate(_chunk_table(layout, world)):
            if chunk >= 0:
                held[rank] += sums[chunk]
    return [RankTraffic(r, read[r], sent[r], recv[r], held[r], staging[r]) for r in range(world)]
