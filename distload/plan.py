"""The load plan: frozen dataclasses, JSON (de)serialisation, and the pure geometry derived from it.

The coordinator builds one :class:`LoadPlan` (see ``distload.planner``) and broadcasts it as
JSON; every rank then derives from it, with the pure functions below, exactly which bytes it
reads, sends and receives in each bucket. Nothing here imports torch, so a plan can be built,
printed and tested with plain integers for the world size.

Vocabulary:

* a *piece* (:class:`Item`) is a run of rows ``[start, stop)`` along dim 0 of one tensor -- a
  contiguous byte range of the file; large tensors are cut into pieces so that buffers stay
  bounded, and dim-0 shards are cut at chunk boundaries;
* a *part* (:class:`Part`) is the region of one piece that one rank holds;
* a *bucket* (:class:`Bucket`) is a set of pieces read by one reader rank and moved together in
  one step of the global order: ``local`` (only the reader needs them; no communication),
  ``broadcast`` (every rank needs all of them in full) or ``p2p`` (each rank receives only its
  parts);
* the *receivers* of a ``p2p`` bucket are partitioned into *classes*: ranks that hold exactly
  the same parts of every piece (e.g. the data-parallel replicas of one tensor-parallel
  rank). The bytes of a class are packed once; a class of several ranks is served by one
  *multicast*: the reader sends its buffer to the class's first rank (the *root*: the reader
  itself when it is a member, else a member on the reader's node), which broadcasts it within
  the class. So the reader's link carries each distinct part once, however many replicas.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from distload.checkpoint import CheckpointIndex, TensorMeta
from distload.dtypes import ITEMSIZE
from distload.placement.base import Box, Layout, box_shape, local_box
from distload.transforms import Link

ALIGN = 64  # byte alignment of every segment inside a staging buffer
BucketKind = Literal["local", "broadcast", "p2p"]


# shared buckets between two status checks when p2p buckets run concurrently
CHECK_EVERY = 64


@dataclass(frozen=True)
class Item:
    """One piece: rows ``[start, stop)`` along dim 0 of tensor ``tensor`` (0-d: rows 0..1)."""

    tensor: int  # index into ``LoadPlan.index.tensors``
    start: int  # first row
    stop: int  # one past the last row


@dataclass(frozen=True)
class Bucket:
    """Pieces read by ``reader`` and moved in one step of the global order."""

    kind: BucketKind  # "local" | "broadcast" | "p2p"
    reader: int  # group rank that reads these pieces from storage
    items: tuple[Item, ...]  # in file order
    # p2p only: every rank holding a part, partitioned into classes of ranks that hold the same
    # parts; the first rank of a class is its root (see the module docstring), the rest sorted
    classes: tuple[tuple[int, ...], ...] = ()

    def multicasts(self) -> tuple[tuple[int, ...], ...]:
        """Classes served by one broadcast inside the class (two or more ranks)."""
        return tuple(c for c in self.classes if len(c) > 1)

    def receivers(self, world_size: int) -> frozenset[int]:
        """Ranks that get this bucket's bytes: every rank of a broadcast, the classes of a p2p
        bucket, the reader of a local bucket."""
        if self.kind == "broadcast":
            return frozenset(range(world_size))
        if self.kind == "local":
            return frozenset((self.reader,))
        return frozenset(r for c in self.classes for r in c)

    def participants(self, world_size: int) -> frozenset[int]:
        """Ranks that take part in this bucket's step: its receivers and its reader."""
        return self.receivers(world_size) | {self.reader}


@dataclass(frozen=True)
class Output:
    """A tensor the caller receives (a stored tensor, or a view made by key transforms)."""

    name: str
    shape: tuple[int, ...]
    stored_dtype: str  # dtype of the stored bytes it is made of


@dataclass(frozen=True)
class LoadPlan:
    """Everything every rank needs to run a load, identical on all ranks."""

    world_size: int  # size of the load's group
    bucket_bytes: int  # target size of one bucket (staging buffers are sized from it)
    index: CheckpointIndex  # the validated checkpoint (stored tensors: what is read)
    outputs: tuple[Output, ...]  # what the caller receives
    links: tuple[tuple[int, Link], ...]  # (output index, link): stored boxes -> output boxes
    layouts: tuple[Layout, ...]  # per output
    dtypes: tuple[str, ...]  # destination dtype per output (safetensors names)
    buckets: tuple[Bucket, ...]  # the one global order of work (pieces of stored tensors)
    placement: str  # human-readable description of the placement used
    skipped: tuple[str, ...] = ()  # outputs not loaded (filtered out by name)
    nodes: tuple[int, ...] = ()  # node index of every rank (empty: unknown)
    # integrity: stored tensor index -> (rows per chunk, sha256 of each chunk); pieces are
    # then cut exactly on that grid and each is checked as it is read
    digests: tuple[tuple[int, int, tuple[str, ...]], ...] = ()
    # Hub sources: the pinned commit, cache domains and downloads (``distload.hub.plan``)
    hub: dict[str, Any] | None = None
    token: str = ""  # unique per load (names its shared-memory files)
    # shared buckets between two status checks while p2p buckets run concurrently (see
    # distload.execute); part of the plan so that every rank checks before the same buckets
    check_every: int = CHECK_EVERY

    @property
    def tensors(self) -> tuple[TensorMeta, ...]:
        """The stored tensors (what pieces refer to)."""
        return self.index.tensors

    def multicast_groups(self) -> tuple[tuple[int, ...], ...]:
        """Every distinct set of ranks some bucket multicasts to (sorted ranks, sorted list):
        the sub-groups a transport creates, in this order on every rank, before executing."""
        found = {tuple(sorted(c)) for b in self.buckets for c in b.multicasts()}
        return tuple(sorted(found, key=lambda g: (len(g), g)))

    def status_checks(self, *, shm: bool = False) -> frozenset[int]:
        """Numbers of the shared buckets before which all ranks agree on a status flag (the
        same on every rank): every shared bucket when shared buckets go through same-node
        shared memory; over the transport every broadcast and every ``check_every``-th shared
        bucket (p2p buckets in between involve only their own ranks)."""
        shared = [n for n, b in enumerate(self.buckets) if b.kind != "local"]
        every = max(1, self.check_every)
        return frozenset(
            n
            for i, n in enumerate(shared)
            if shm or self.buckets[n].kind == "broadcast" or i % every == 0
        )

    def links_of(self, stored: int) -> list[tuple[int, Link]]:
        """(output, link) pairs reading from stored tensor ``stored``."""
        return self._links_table().get(stored, [])

    def _links_table(self) -> dict[int, list[tuple[int, Link]]]:
        """Stored tensor -> its (output, link) pairs, built once per plan object."""
        table = self.__dict__.get("_by_stored")
        if table is None:
            table = {}
            for out, link in self.links:
                table.setdefault(link.stored, []).append((out, link))
            object.__setattr__(self, "_by_stored", table)
        return table

    def identity_output(self, stored: int) -> int | None:
        """The output that is stored tensor ``stored`` itself -- its only link, covering all
        of both and not transposed (no key transform touches it: the common case) -- under
        any layout, or None. Its geometry needs no box arithmetic (see :func:`parts_of`).
        Computed for every stored tensor once per plan object."""
        table = self.__dict__.get("_identity")
        if table is None:
            table = {}
            for stored_index, pairs in self._links_table().items():
                if len(pairs) != 1:
                    continue
                out, link = pairs[0]
                shape = self.tensors[stored_index].shape
                full = tuple((0, n) for n in shape)
                if (
                    not link.transposed
                    and link.stored_box == full
                    and link.view_box == full
                    and self.outputs[out].shape == shape
                ):
                    table[stored_index] = out
            object.__setattr__(self, "_identity", table)
        return table.get(stored)

    def whole_output(self, stored: int) -> int | None:
        """:meth:`identity_output`, when laid out as full copies (a replicated tensor without
        key transforms): each holder's part of a piece is the whole piece."""
        out = self.identity_output(stored)
        return out if out is not None and self.layouts[out].dim is None else None

    def to_json(self) -> bytes:
        """The plan as compact JSON (what rank 0 broadcasts). Tensors loaded as they are
        stored -- the usual case -- take one integer for their output and link, and each
        distinct layout is written once: a checkpoint of tens of thousands of tensors then
        costs little to encode, send and decode on every rank."""
        tensors = self.tensors
        links_by_out: dict[int, list[Link]] = {}
        for out, link in self.links:
            links_by_out.setdefault(out, []).append(link)
        outputs: list[Any] = []
        links: list[Any] = []
        for out, o in enumerate(self.outputs):
            mine = links_by_out.get(out, [])
            if len(mine) == 1 and _is_identity(mine[0], tensors[mine[0].stored], o):
                outputs.append(mine[0].stored)  # the stored tensor itself
                continue
            outputs.append([o.name, list(o.shape), o.stored_dtype])
            links.extend([out, ln.stored, ln.stored_box, ln.view_box, ln.transposed] for ln in mine)
        layout_table: dict[Layout, int] = {}
        layout_of = [layout_table.setdefault(lay, len(layout_table)) for lay in self.layouts]
        return json.dumps(
            {
                "world_size": self.world_size,
                "bucket_bytes": self.bucket_bytes,
                "index": self.index.to_json(),
                "outputs": outputs,
                "links": links,
                "layout_table": [lay.to_json() for lay in layout_table],
                "layouts": layout_of,
                "dtypes": list(self.dtypes),
                "buckets": [
                    [
                        b.kind,
                        b.reader,
                        [[i.tensor, i.start, i.stop] for i in b.items],
                        [list(c) for c in b.classes],
                    ]
                    for b in self.buckets
                ],
                "placement": self.placement,
                "skipped": list(self.skipped),
                "nodes": list(self.nodes),
                "digests": [[t, rows, list(chunks)] for t, rows, chunks in self.digests],
                "hub": self.hub,
                "token": self.token,
                "check_every": self.check_every,
            },
            separators=(",", ":"),
        ).encode()

    @staticmethod
    def from_json(data: bytes) -> LoadPlan:
        raw: dict[str, Any] = json.loads(data.decode())

        def box(b: list[list[int]]) -> Box:
            return tuple((int(x), int(y)) for x, y in b)

        index = CheckpointIndex.from_json(raw["index"])
        outputs: list[Output] = []
        links: list[tuple[int, Link]] = []
        for out, o in enumerate(raw["outputs"]):
            if isinstance(o, int):  # a stored tensor as it is (see to_json)
                meta = index.tensors[o]
                full = tuple((0, n) for n in meta.shape)
                outputs.append(Output(meta.name, meta.shape, meta.dtype))
                links.append((out, Link(o, full, full, False)))
            else:
                outputs.append(Output(o[0], tuple(o[1]), o[2]))
        links.extend(
            (out, Link(stored, box(sb), box(vb), bool(tr)))
            for out, stored, sb, vb, tr in raw["links"]
        )
        links.sort(key=lambda pair: pair[0])  # stable: each output's links keep their order
        table = [Layout.from_json(x) for x in raw["layout_table"]]
        return LoadPlan(
            world_size=raw["world_size"],
            bucket_bytes=raw["bucket_bytes"],
            index=index,
            outputs=tuple(outputs),
            links=tuple(links),
            layouts=tuple(table[i] for i in raw["layouts"]),
            dtypes=tuple(raw["dtypes"]),
            buckets=tuple(
                Bucket(
                    b[0],
                    b[1],
                    tuple(Item(*i) for i in b[2]),
                    tuple(tuple(c) for c in b[3]) if len(b) > 3 else (),
                )
                for b in raw["buckets"]
            ),
            placement=raw["placement"],
            skipped=tuple(raw.get("skipped", ())),
            nodes=tuple(raw.get("nodes", ())),
            digests=tuple(
                (int(t), int(rows), tuple(chunks)) for t, rows, chunks in raw.get("digests", ())
            ),
            hub=raw.get("hub"),
            token=raw.get("token", ""),
            check_every=int(raw.get("check_every", CHECK_EVERY)),
        )

    def local_shape(self, output: int, rank: int) -> tuple[int, ...] | None:
        """Shape of the part of output ``output`` held by ``rank`` (None: holds nothing)."""
        layout = self.layouts[output]
        if layout.dim is None:  # a full copy on each holder: no box needed
            held = layout.holders is None or rank in layout.holders
            return self.outputs[output].shape if held else None
        box = local_box(self.outputs[output].shape, self.layouts[output], rank)
        return None if box is None else box_shape(box)


# --------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class Part:
    """A region of one piece that one rank holds, and where it goes."""

    output: int  # output tensor it fills
    src: Box  # region inside the piece (stored orientation, rows relative to item.start)
    dst: Box  # region inside the rank's local output tensor
    shape: tuple[int, ...]  # shape of the region in output orientation
    transposed: bool = False  # dst = src transposed

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _is_identity(link: Link, meta: TensorMeta, output: Output) -> bool:
    """Whether an output is stored tensor ``meta`` as it is: same name, shape and dtype, one
    link covering all of it, not transposed (how :meth:`LoadPlan.to_json` abbreviates it)."""
    full = tuple((0, n) for n in meta.shape)
    return (
        not link.transposed
        and link.stored_box == full
        and link.view_box == full
        and output.name == meta.name
        and output.shape == meta.shape
        and output.stored_dtype == meta.dtype
    )


def piece_shape(meta: TensorMeta, item: Item) -> tuple[int, ...]:
    if not meta.shape:
        return ()
    return (item.stop - item.start, *meta.shape[1:])


def piece_bytes(meta: TensorMeta, item: Item) -> int:
    return (item.stop - item.start) * meta.row_bytes if meta.shape else meta.nbytes


def piece_offset(meta: TensorMeta, item: Item) -> int:
    """Absolute file offset of a piece's first byte."""
    return meta.offset + item.start * meta.row_bytes


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return None if any(lo >= hi for lo, hi in out) else out


def _to_stored(link: Link, view: Box) -> Box:
    """Stored region of a view region inside ``link``."""
    rel = [(a - o, b - o) for (a, b), (o, _) in zip(view, link.view_box, strict=True)]
    if link.transposed:
        rel = [rel[1], rel[0]]
    return tuple((a + o, b + o) for (a, b), (o, _) in zip(rel, link.stored_box, strict=True))


def _to_view(link: Link, stored: Box) -> Box:
    """View region of a stored region inside ``link``."""
    rel = [(a - o, b - o) for (a, b), (o, _) in zip(stored, link.stored_box, strict=True)]
    if link.transposed:
        rel = [rel[1], rel[0]]
    return tuple((a + o, b + o) for (a, b), (o, _) in zip(rel, link.view_box, strict=True))


def parts_of(plan: LoadPlan, rank: int, item: Item) -> list[Part]:
    """Regions of piece ``item`` that ``rank`` holds (one per output region it fills)."""
    meta = plan.tensors[item.tensor]
    whole = plan.whole_output(item.tensor)
    if whole is not None:
        # the stored tensor is the output, whole, in full copies (replicated, untransformed):
        # a holder's part is the whole piece at the piece's rows (the common case, made cheap)
        held = plan.layouts[whole].holders
        if held is not None and rank not in held:
            return []
        if not meta.shape:
            return [Part(whole, (), (), ())]
        rest = tuple((0, n) for n in meta.shape[1:])
        rows = item.stop - item.start
        return [
            Part(
                whole, ((0, rows), *rest), ((item.start, item.stop), *rest), (rows, *meta.shape[1:])
            )
        ]
    same = plan.identity_output(item.tensor)
    if same is not None and meta.shape:
        # the stored tensor is the output (sharded): stored and view coordinates agree, so
        # the part is the rank's box cut to the piece's rows
        box = local_box(meta.shape, plan.layouts[same], rank)
        if box is None:
            return []
        (lo, hi), rest = box[0], box[1:]
        lo, hi = max(lo, item.start), min(hi, item.stop)
        if lo >= hi or any(a >= b for a, b in rest):
            return []
        dst = ((lo - box[0][0], hi - box[0][0]), *((0, b - a) for a, b in rest))
        shape = (hi - lo, *(b - a for a, b in rest))
        return [Part(same, ((lo - item.start, hi - item.start), *rest), dst, shape)]
    parts = []
    for out, link in plan.links_of(item.tensor):
        box = local_box(plan.outputs[out].shape, plan.layouts[out], rank)
        if box is None:
            continue
        if not meta.shape:
            parts.append(Part(out, (), (), ()))
            continue
        view = _intersect(box, link.view_box)
        if view is None:
            continue
        stored = _to_stored(link, view)
        rows = ((item.start, item.stop), *((0, n) for n in meta.shape[1:]))
        stored = _intersect(stored, rows)
        if stored is None:
            continue
        view = _to_view(link, stored)
        src = ((stored[0][0] - item.start, stored[0][1] - item.start), *stored[1:])
        dst = tuple((a - o, b - o) for (a, b), (o, _) in zip(view, box, strict=True))
        parts.append(Part(out, src, dst, box_shape(view), link.transposed))
    return parts


def wire_dtype(stored: str, dest: str) -> str:
    """Dtype a piece travels in: the narrower of stored and destination (cast where it saves)."""
    return dest if ITEMSIZE[dest] <= ITEMSIZE[stored] else stored


def aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


@dataclass(frozen=True)
class Segment:
    """One part inside a staging buffer: where it lies and where it goes."""

    item: Item
    part: Part
    dtype: str  # dtype of the bytes in the buffer
    offset: int  # byte offset inside the buffer (ALIGN-aligned)
    nbytes: int


def read_slots(plan: LoadPlan, bucket: Bucket) -> tuple[list[Segment], int]:
    """The reader's layout of a bucket: whole pieces in their stored dtype -> (slots, size)."""
    slots: list[Segment] = []
    cursor = 0
    for item in bucket.items:
        meta = plan.tensors[item.tensor]
        shape = piece_shape(meta, item)
        full = Part(-1, tuple((0, n) for n in shape), (), shape)
        nbytes = piece_bytes(meta, item)
        slots.append(Segment(item, full, meta.dtype, cursor, nbytes))
        cursor = aligned(cursor + nbytes)
    return slots, cursor


def read_bytes(plan: LoadPlan, bucket: Bucket) -> int:
    """Size of a bucket's read layout (:func:`read_slots`'s second value, without building
    the slots: what sizing staging buffers needs)."""
    cursor = 0
    tensors = plan.tensors
    for item in bucket.items:
        cursor = -(-(cursor + piece_bytes(tensors[item.tensor], item)) // ALIGN) * ALIGN
    return cursor


def segments_for(plan: LoadPlan, bucket: Bucket, rank: int) -> tuple[list[Segment], int]:
    """What ``rank`` receives from ``bucket`` (its parts, packed, in wire dtypes), and the size.

    The reader packs exactly this layout for each destination, so both sides agree without
    exchanging any metadata. For a broadcast bucket every rank gets the same layout.
    """
    segs: list[Segment] = []
    cursor = 0
    tensors, dtypes = plan.tensors, plan.dtypes
    for item in bucket.items:
        stored = tensors[item.tensor].dtype
        for part in parts_of(plan, rank, item):
            dtype = wire_dtype(stored, dtypes[part.output])
            nbytes = math.prod(part.shape) * ITEMSIZE[dtype]
            segs.append(Segment(item, part, dtype, cursor, nbytes))
            cursor = -(-(cursor + nbytes) // ALIGN) * ALIGN  # aligned(), inlined: hot loop
    return segs, cursor


def receiving_classes(plan: LoadPlan, bucket: Bucket) -> list[tuple[tuple[int, ...], int]]:
    """Who receives what from a shared bucket: (class, bytes each member receives), root first.

    A broadcast is one class of every rank rooted at the reader; a p2p bucket has its own
    classes. Sizes come from one ``segments_for`` per class (members receive identical bytes).
    """
    if bucket.kind == "local":
        return []
    if bucket.kind == "broadcast":
        everyone = (bucket.reader, *(r for r in range(plan.world_size) if r != bucket.reader))
        return [(everyone, segments_for(plan, bucket, bucket.reader)[1])]
    return [(c, segments_for(plan, bucket, c[0])[1]) for c in bucket.classes]
