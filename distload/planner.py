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

import dataclasses
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from distload.accounting import RankTraffic, traffic
from distload.dtypes import FLOATING, ITEMSIZE
from distload.errors import PlacementError
from distload.geometry import piece_bytes
from distload.hub.plan import HubPlan
from distload.index import CheckpointIndex, TensorMeta
from distload.manifest import Digests
from distload.pieces import ChunkClasses, Classes, holder_classes, piece_classes, split_pieces
from distload.placement.base import Layout, Placement, ReplicateAll
from distload.plan import CHECK_EVERY, Bucket, BucketKind, Item, LoadPlan, Output
from distload.transforms import Transform, apply_transforms

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "RankTraffic",
    "destination_dtypes",
    "evaluate_layouts",
    "holder_classes",
    "interleave",
    "make_plan",
    "traffic",
]

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


def output_metas(outputs: Sequence[Output]) -> list[TensorMeta]:
    """What a placement sees of the outputs: name, stored dtype, shape and bytes."""
    return [
        TensorMeta(
            o.name, "", o.stored_dtype, o.shape, 0, math.prod(o.shape) * ITEMSIZE[o.stored_dtype]
        )
        for o in outputs
    ]


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
    """A bucket being filled: its pieces and their bytes so far."""

    items: list[Item] = field(default_factory=list)
    nbytes: int = 0


BucketKey = tuple[BucketKind, tuple[int, ...], Classes]  # (kind, readers allowed, classes)


@dataclass
class _Bucketer:
    """Groups pieces into buckets and gives each bucket its reader (step 4 of the module
    docstring). Keeps the balance of bytes per reader and the caches that make a checkpoint
    of tens of thousands of tensors with a handful of distinct layouts cheap to plan."""

    world_size: int
    bucket_bytes: int
    readers: tuple[int, ...]
    nodes: Sequence[int]
    load: dict[int, int] = field(init=False)
    ordered: list[tuple[int, Bucket]] = field(default_factory=list)  # (position, bucket)
    local_open: dict[int, _Open] = field(default_factory=dict)
    # shared buckets by kind, by the readers allowed for their files and by their receiver
    # classes (pieces of one bucket split their receivers the same way)
    shared_open: dict[BucketKey, _Open] = field(default_factory=dict)
    position: int = 0
    near_cache: dict[BucketKey, tuple[int, ...]] = field(default_factory=dict)
    rooted_cache: dict[tuple[Classes, int], Classes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.load = dict.fromkeys(self.readers, 0)

    def add(self, item: Item, nbytes: int, classes: Classes, pool: tuple[int, ...]) -> None:
        """Put one piece (held by ``classes``, readable by ``pool``) into its open bucket."""
        self.position += 1
        if len(classes) == 1 and len(classes[0]) == 1 and classes[0][0] in pool:
            kind: BucketKind = "local"
            key: BucketKey = (kind, pool, ())
            bucket = self.local_open.setdefault(classes[0][0], _Open())
        elif len(classes) == 1 and len(classes[0]) == self.world_size:
            kind = "broadcast"  # every rank holds the same regions: one broadcast serves all
            key = (kind, pool, ())
            bucket = self.shared_open.setdefault(key, _Open())
        else:
            kind = "p2p"
            key = (kind, pool, classes)
            bucket = self.shared_open.setdefault(key, _Open())
        if bucket.items and bucket.nbytes + nbytes > self.bucket_bytes:
            reader = classes[0][0] if kind == "local" else None
            self.close(kind, reader, bucket, pool, key[2])
        bucket.items.append(item)
        bucket.nbytes += nbytes

    def close(
        self,
        kind: BucketKind,
        reader: int | None,
        bucket: _Open,
        pool: tuple[int, ...],
        classes: Classes = (),
    ) -> None:
        """Turn an open bucket into a :class:`Bucket` of the least loaded allowed reader."""
        if not bucket.items:
            return
        if reader is None:
            # a p2p bucket is read by one of its receivers where one may read it: its bytes
            # then start where they are needed, and buckets of disjoint receivers (pipeline
            # stages) involve disjoint ranks, so they move at the same time
            candidates = self.near_cache.get((kind, pool, classes))
            if candidates is None:
                holding = {r for c in classes for r in c}
                near = tuple(r for r in pool if r in holding) if kind == "p2p" else ()
                candidates = near or pool
                self.near_cache[(kind, pool, classes)] = candidates
            reader = min(candidates, key=lambda r: (self.load[r], r))
        self.load[reader] += bucket.nbytes
        rooted = self.rooted_cache.get((classes, reader))
        if rooted is None:
            rooted = tuple(_rooted(c, reader, self.nodes) for c in classes)
            self.rooted_cache[(classes, reader)] = rooted
        self.ordered.append((self.position, Bucket(kind, reader, tuple(bucket.items), rooted)))
        bucket.items, bucket.nbytes = [], 0

    def finish(self) -> tuple[Bucket, ...]:
        """Close every open bucket; the buckets in the global order (see :func:`interleave`)."""
        for (kind, pool, classes), bucket in self.shared_open.items():
            self.close(kind, None, bucket, pool, classes)
        for rank, bucket in sorted(self.local_open.items()):
            self.close("local", rank, bucket, self.readers)
        self.ordered.sort(key=lambda pb: pb[0])
        return interleave([b for _, b in self.ordered], self.world_size)


def _reader_pools(
    readers: Collection[int] | None,
    world_size: int,
    file_readers: Mapping[str, Collection[int]] | None,
) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
    """The ranks allowed to read (sorted), and per file named in ``file_readers`` the allowed
    readers among them."""
    everyone = tuple(sorted(set(range(world_size) if readers is None else readers)))
    if not everyone or not all(0 <= r < world_size for r in everyone):
        raise PlacementError(
            f"readers {list(everyone)} must be non-empty ranks of 0..{world_size - 1}"
        )
    by_file: dict[str, tuple[int, ...]] = {}
    for file, ranks in (file_readers or {}).items():
        by_file[file] = tuple(r for r in everyone if r in set(ranks))
        if not by_file[file]:
            raise PlacementError(
                f"file {file!r} may be read by ranks {sorted(ranks)}, none of them a reader "
                f"({everyone})",
                file=file,
            )
    return everyone, by_file


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
    hub: HubPlan | None = None,
    token: str = "",
    check_every: int = CHECK_EVERY,
    multicast: bool = True,
) -> LoadPlan:
    """Build the finished plan for loading ``index`` into a group of ``world_size`` ranks.

    Args:
        placement: layout rule per output tensor (default: replicate everything).
        dtype: destination dtype for floating tensors (None keeps the stored dtype).
        bucket_bytes: bound on one bucket's bytes (staging buffers are a few of these).
        readers: ranks allowed to read from storage (default: all).
        names: load only these output tensors (default: all).
        transforms: key transforms (rename, split, merge, transpose) applied to the
            checkpoint's tensors first; placements and ``names`` see the transformed names.
        nodes: node index of every rank (``agreement.agree_on_arguments``), kept in the plan.
        digests: manifest chunk hashes per stored tensor (``distload.manifest``): pieces
            follow the manifest's chunk grid and readers check each one as they read it.
        file_readers: file -> ranks allowed to read it (within ``readers``); e.g. the ranks
            whose Hub cache holds that shard. Files not named may be read by any reader.
        hub, token, check_every, multicast: carried as they are (see :class:`LoadPlan`).
    """
    for what, value in (("world_size", world_size), ("bucket_bytes", bucket_bytes)):
        if value < 1:
            raise PlacementError(f"{what} must be >= 1, got {value}")
    placement = placement or ReplicateAll()
    views = apply_transforms(index, transforms)
    skipped: tuple[str, ...] = ()
    if names is not None:
        wanted = set(names)
        skipped = tuple(v.name for v in views if v.name not in wanted)
        views = [v for v in views if v.name in wanted]
    everyone, allowed_by_file = _reader_pools(readers, world_size, file_readers)
    outputs = tuple(Output(v.name, v.shape, v.dtype) for v in views)
    links = tuple((o, link) for o, v in enumerate(views) for link in v.links)
    used = sorted({link.stored for _, link in links})
    # the plan without its buckets: the geometry of pieces needs outputs, links and layouts
    draft = LoadPlan(
        world_size=world_size,
        bucket_bytes=bucket_bytes,
        index=index,
        outputs=outputs,
        links=links,
        layouts=evaluate_layouts(output_metas(outputs), placement, world_size),
        dtypes=destination_dtypes([v.dtype for v in views], dtype),
        buckets=(),
        placement=placement.describe(),
        skipped=skipped,
        nodes=tuple(nodes),
        digests=tuple(
            (t, d.rows_per_chunk, d.chunks)
            for t, d in sorted((digests or {}).items())
            if t in set(used)
        ),
        hub=hub,
        token=token,
        check_every=check_every,
        multicast=multicast,
    )
    bucketer = _Bucketer(world_size, bucket_bytes, everyone, nodes)
    _fill(draft, bucketer, used, digests, allowed_by_file)
    return dataclasses.replace(draft, buckets=bucketer.finish())


def _fill(
    draft: LoadPlan,
    bucketer: _Bucketer,
    used: Sequence[int],
    digests: Mapping[int, Digests] | None,
    allowed_by_file: Mapping[str, tuple[int, ...]],
) -> None:
    """Cut every stored tensor the draft reads into pieces, in file order, and give each
    piece with holders to the bucketer (steps 2 and 3 of the module docstring)."""
    holder_cache: dict[tuple[Layout, ...], list[list[int]]] = {}
    chunk_cache: dict[tuple[Layout, int], ChunkClasses] = {}  # see piece_classes
    for t in used:
        meta = draft.index.tensors[t]
        pool = allowed_by_file.get(meta.file, bucketer.readers)
        grid = digests[t].rows_per_chunk if digests and t in digests else None
        holding = holder_classes(draft, t, holder_cache)
        for item in split_pieces(draft, t, draft.bucket_bytes, grid):
            classes = piece_classes(draft, item, holding, chunk_cache)
            if classes:
                bucketer.add(item, piece_bytes(meta, item), classes, pool)
            else:
                bucketer.position += 1


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
