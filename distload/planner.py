"""The planner: placement + checkpoint index -> :class:`~distload.plan.LoadPlan`.

Pure Python, run by the coordinator only; it never imports torch.distributed, so it is tested
with plain integers for the world size and used offline by ``distload plan``.

Steps:

1. evaluate the placement for every tensor (a :class:`~distload.placement.base.Layout`);
2. cut tensors into pieces of at most ``bucket_bytes`` along dim 0, also at dim-0 shard
   boundaries so that a piece of a row-sharded tensor belongs to one chunk;
3. classify each piece: needed by one rank only -> that rank reads it itself (``local``); needed
   in full by every rank -> ``broadcast``; anything else -> ``p2p`` (each rank gets its part);
4. group consecutive pieces of one kind into buckets of at most ``bucket_bytes`` and give each
   bucket to the reader with the fewest bytes so far, so every byte is read by exactly one rank
   and reading is balanced; local pieces count towards their reader's share first.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from distload.checkpoint import CheckpointIndex, TensorMeta
from distload.dtypes import FLOATING, ITEMSIZE
from distload.errors import PlacementError
from distload.manifest import Digests
from distload.placement.base import Layout, Placement, ReplicateAll
from distload.plan import (
    Bucket,
    BucketKind,
    Item,
    LoadPlan,
    Output,
    parts_of,
    piece_bytes,
    read_slots,
    segments_for,
)
from distload.transforms import Transform, apply_transforms

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024


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
    for meta, layout in zip(tensors, layouts, strict=True):
        if layout.holders is not None and not all(0 <= r < world_size for r in layout.holders):
            raise PlacementError(
                f"placement put tensor {meta.name!r} on ranks {list(layout.holders)}, outside "
                f"the group of {world_size}",
                tensor=meta.name,
            )
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
        vdim = 1 if link.transposed else 0  # the view dim that runs along stored rows
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
    if grid is not None:
        rows = meta.shape[0]
        return [Item(stored, s, min(rows, s + grid)) for s in range(0, rows, grid)]
    per_piece = max(1, bucket_bytes // max(1, meta.row_bytes))
    edges = sorted(_row_cuts(plan, stored))
    items = []
    for lo, hi in itertools.pairwise(edges):
        for start in range(lo, hi, per_piece):
            items.append(Item(stored, start, min(hi, start + per_piece)))
    return items


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
    # shared buckets by kind and by the readers allowed for their files
    shared_open: dict[tuple[BucketKind, tuple[int, ...]], _Open] = {}
    position = 0

    def close(kind: BucketKind, reader: int | None, bucket: _Open, pool: tuple[int, ...]) -> None:
        if not bucket.items:
            return
        if reader is None:
            reader = min(pool, key=lambda r: (load[r], r))
        load[reader] += bucket.nbytes
        ordered.append((position, Bucket(kind, reader, tuple(bucket.items))))
        bucket.items, bucket.nbytes = [], 0

    used = sorted({link.stored for _, link in links})
    for t in used:
        meta = index.tensors[t]
        pool = allowed_by_file.get(meta.file, everyone)
        grid = digests[t].rows_per_chunk if digests and t in digests else None
        for item in split_pieces(skeleton, t, bucket_bytes, grid):
            position += 1
            nbytes = piece_bytes(meta, item)
            # each rank's regions of this piece, computed once
            parts = [parts_of(skeleton, rank, item) for rank in range(world_size)]
            who = [rank for rank, held in enumerate(parts) if held]
            if not who:
                continue
            if len(who) == 1 and who[0] in pool:
                kind: BucketKind = "local"
                bucket = local_open.setdefault(who[0], _Open())
            elif len(who) == world_size and all(p == parts[0] for p in parts):
                # every rank holds the same regions: one broadcast serves all
                kind = "broadcast"
                bucket = shared_open.setdefault((kind, pool), _Open())
            else:
                kind = "p2p"
                bucket = shared_open.setdefault((kind, pool), _Open())
            if bucket.items and bucket.nbytes + nbytes > bucket_bytes:
                close(kind, who[0] if kind == "local" else None, bucket, pool)
            bucket.items.append(item)
            bucket.nbytes += nbytes
    for (kind, pool), bucket in shared_open.items():
        close(kind, None, bucket, pool)
    for rank, bucket in sorted(local_open.items()):
        close("local", rank, bucket, everyone)
    ordered.sort(key=lambda pb: pb[0])
    buckets = tuple(b for _, b in ordered)
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


def traffic(plan: LoadPlan) -> list[RankTraffic]:
    """Per-rank byte accounting of a plan (what ``distload plan`` prints)."""
    world = plan.world_size
    read, sent, recv, staging = [0] * world, [0] * world, [0] * world, [0] * world
    for bucket in plan.buckets:
        _, size = read_slots(plan, bucket)
        read[bucket.reader] += sum(piece_bytes(plan.tensors[i.tensor], i) for i in bucket.items)
        staging[bucket.reader] = max(staging[bucket.reader], size)
        if bucket.kind == "local":
            continue
        ranks = range(world)
        for rank in ranks:
            if rank == bucket.reader:
                continue
            _, nbytes = segments_for(plan, bucket, rank)
            if bucket.kind == "p2p" and nbytes == 0:
                continue
            recv[rank] += nbytes
            sent[bucket.reader] += nbytes
            staging[rank] = max(staging[rank], nbytes)
    held = [0] * world
    for t, _meta in enumerate(plan.tensors):
        for rank in range(world):
            shape = plan.local_shape(t, rank)
            if shape is not None:
                n = 1
                for d in shape:
                    n *= d
                held[rank] += n * ITEMSIZE[plan.dtypes[t]]
    return [RankTraffic(r, read[r], sent[r], recv[r], held[r], staging[r]) for r in range(world)]
