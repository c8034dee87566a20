"""The load plan: frozen dataclasses and their compact JSON form.

The coordinator builds one :class:`LoadPlan` (see ``distload.planner``) and broadcasts it as
JSON; every rank then derives from it, with the pure functions of ``distload.geometry``,
exactly which bytes it reads, sends and receives in each bucket. Nothing here imports torch,
so a plan can be built, printed and tested with plain integers for the world size.

Vocabulary:

* a *piece* (:class:`Item`) is a run of rows ``[start, stop)`` along dim 0 of one tensor -- a
  contiguous byte range of the file; large tensors are cut into pieces so that buffers stay
  bounded, and dim-0 shards are cut at chunk boundaries;
* a *part* (``distload.geometry.Part``) is the region of one piece that one rank holds;
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
from dataclasses import dataclass, field
from typing import Any, Literal

from distload.derived import Beside
from distload.dtypes import ITEMSIZE
from distload.hub.plan import HubPlan
from distload.index import CheckpointIndex, TensorMeta
from distload.placement.base import Box, Layout, box_shape, local_box
from distload.transforms import Link

ALIGN = 64  # byte alignment of every segment inside a staging buffer
# pieces of at least MIRROR_BYTES lie in a read layout at the offset, modulo MIRROR_ALIGN, of
# their bytes in the file, so that an O_DIRECT read (DMA) lands them straight in a staging
# buffer aligned to MIRROR_ALIGN (``distload.storage``); pieces stored back to back then lie
# back to back in the buffer, and each other piece costs at most MIRROR_ALIGN of padding
MIRROR_ALIGN = 4096
MIRROR_BYTES = 64 * 1024
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
    hub: HubPlan | None = None
    token: str = ""  # unique per load (names its shared-memory files)
    # shared buckets between two status checks while p2p buckets run concurrently (see
    # distload.execute); part of the plan so that every rank checks before the same buckets
    check_every: int = CHECK_EVERY
    # whether classes of several receivers are served through sub-groups of the transport
    # (decided once, on rank 0, like every choice that changes which collectives run)
    multicast: bool = True
    # files every node holds in its page cache (a local source; rank 0 probed them on one
    # node, each node's first rank over several: distload.residency): their shared buckets
    # need no reader and no transfer -- each rank reads its own parts from the page cache
    # (distload.execute.pagecache) on host-memory transports
    cached_files: tuple[str, ...] = ()

    @property
    def tensors(self) -> tuple[TensorMeta, ...]:
        """The stored tensors (what pieces refer to)."""
        return self.index.tensors

    def cached_buckets(self) -> frozenset[int]:
        """Shared buckets whose pieces all lie in files of :attr:`cached_files`: copied from
        the page cache by every rank that needs them (none with verify=: it checks the bytes
        as they are read)."""
        if not self.cached_files or self.digests:
            return frozenset()
        cached, tensors, out = set(self.cached_files), self.tensors, set()
        for number, bucket in enumerate(self.buckets):
            metas = [tensors[i.tensor] for i in bucket.items]
            if bucket.kind == "local" or not all(m.file in cached for m in metas):
                continue
            # typed views of a mapping need each piece at a multiple of its element size
            if all(m.offset % ITEMSIZE[m.dtype] == 0 for m in metas):
                out.add(number)
        return frozenset(out)

    def multicast_groups(self, skip: frozenset[int] = frozenset()) -> tuple[tuple[int, ...], ...]:
        """Every distinct set of ranks some bucket multicasts to (sorted ranks, sorted list):
        the sub-groups a transport creates, in this order on every rank, before executing.
        ``skip``: buckets that move no bytes over the transport (read from the page cache)."""
        found = {
            tuple(sorted(c))
            for n, b in enumerate(self.buckets)
            if n not in skip
            for c in b.multicasts()
        }
        return tuple(sorted(found, key=lambda g: (len(g), g)))

    def status_checks(
        self, *, shm: bool = False, cached: frozenset[int] = frozenset()
    ) -> frozenset[int]:
        """Numbers of the shared buckets before which all ranks agree on a status flag (the
        same on every rank): the last of every ``check_every`` shared buckets in a row, and
        over the transport (not ``shm``) also every broadcast bucket that moves over it (not
        in ``cached``: read from the page cache by every rank). Buckets in between involve
        only their own ranks (p2p) or need no collective at all (shared memory, the page
        cache); the periodic checks bound how long a failure there goes unnoticed. None
        precedes the first shared bucket: the destinations' agreement just came before it,
        and what failed since is shared at the next check or the closing step."""
        shared = [n for n, b in enumerate(self.buckets) if b.kind != "local"]
        every = max(1, self.check_every)
        return frozenset(
            n
            for i, n in enumerate(shared)
            if i % every == every - 1
            or (not shm and n not in cached and self.buckets[n].kind == "broadcast")
        )

    def links_of(self, stored: int) -> list[tuple[int, Link]]:
        """(output, link) pairs reading from stored tensor ``stored``."""
        return tables(self).links_by_stored(self).get(stored, [])

    def identity_output(self, stored: int) -> int | None:
        """The output that is stored tensor ``stored`` itself -- its only link, covering all
        of both and not transposed (no key transform touches it: the common case) -- under
        any layout, or None. Its geometry needs no box arithmetic (see ``geometry.parts_of``).
        Computed for every stored tensor once per plan object (see :class:`PlanTables`)."""
        return tables(self).identity(self).get(stored)

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
            meta = tensors[mine[0].stored] if len(mine) == 1 else None
            same_name = meta is not None and (o.name, o.stored_dtype) == (meta.name, meta.dtype)
            if meta is not None and same_name and _covers(mine[0], meta, o):
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
                "hub": self.hub.to_json() if self.hub is not None else None,
                "token": self.token,
                "check_every": self.check_every,
                "multicast": self.multicast,
                "cached_files": list(self.cached_files),
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
        as_stored: dict[int, int] = {}  # stored tensor -> its output, written as one integer
        for out, o in enumerate(raw["outputs"]):
            if isinstance(o, int):  # a stored tensor as it is (see to_json)
                meta = index.tensors[o]
                full = tuple((0, n) for n in meta.shape)
                outputs.append(Output(meta.name, meta.shape, meta.dtype))
                links.append((out, Link(o, full, full, False)))
                as_stored[o] = out
            else:
                outputs.append(Output(o[0], tuple(o[1]), o[2]))
        spelled = [
            (out, Link(stored, box(sb), box(vb), bool(tr)))
            for out, stored, sb, vb, tr in raw["links"]
        ]
        links.extend(spelled)
        links.sort(key=lambda pair: pair[0])  # stable: each output's links keep their order
        table = [Layout.from_json(x) for x in raw["layout_table"]]
        plan = LoadPlan(
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
            hub=HubPlan.from_json(raw["hub"]) if raw.get("hub") is not None else None,
            token=raw.get("token", ""),
            check_every=int(raw.get("check_every", CHECK_EVERY)),
            multicast=bool(raw.get("multicast", True)),
            cached_files=tuple(raw.get("cached_files", ())),
        )
        # identity_output's table without walking every tensor again: an output written as
        # one integer is its stored tensor's identity unless that tensor also feeds another
        # output; only spelled-out links need checking
        by_stored: dict[int, list[tuple[int, Link]]] = {}
        for out, link in spelled:
            by_stored.setdefault(link.stored, []).append((out, link))
        identity = {t: out for t, out in as_stored.items() if t not in by_stored}
        for t, pairs in by_stored.items():
            out, link = pairs[0]
            covers = _covers(link, index.tensors[t], plan.outputs[out])
            if t not in as_stored and len(pairs) == 1 and covers:
                identity[t] = out
        tables(plan).seed_identity(identity)
        return plan

    def local_shape(self, output: int, rank: int) -> tuple[int, ...] | None:
        """Shape of the part of output ``output`` held by ``rank`` (None: holds nothing)."""
        layout = self.layouts[output]
        if layout.dim is None:  # a full copy on each holder: no box needed
            held = layout.holders is None or rank in layout.holders
            return self.outputs[output].shape if held else None
        box = local_box(self.outputs[output].shape, layout, rank)
        return None if box is None else box_shape(box)


def _covers(link: Link, meta: TensorMeta, output: Output) -> bool:
    """Whether ``link`` maps all of stored tensor ``meta`` onto all of ``output``, of the same
    shape, not transposed (an output that is the stored tensor, whatever its name: see
    :meth:`LoadPlan.identity_output`; :meth:`LoadPlan.to_json` abbreviates those that also
    keep its name and dtype)."""
    full = tuple((0, n) for n in meta.shape)
    return (
        not link.transposed
        and output.shape == meta.shape
        and link.stored_box == full
        and link.view_box == full
    )


# --------------------------------------------------------------------------------------------
# tables derived from a plan, kept beside it


@dataclass
class PlanTables:
    """Lookup tables derived from one plan object, built on first use and kept beside it
    (the plan itself stays plain frozen data). A plan's tables live as long as the plan.

    Asked for by the reader thread and the main thread alike; a table built twice under a
    race has the same content either way.
    """

    _by_stored: dict[int, list[tuple[int, Link]]] | None = None
    _identity: dict[int, int] | None = None
    # per bucket number: the receiving classes of shared buckets (``geometry``)
    receiving: dict[int, list[tuple[tuple[int, ...], int]]] = field(default_factory=dict)

    def links_by_stored(self, plan: LoadPlan) -> dict[int, list[tuple[int, Link]]]:
        """Stored tensor -> its (output, link) pairs."""
        if self._by_stored is None:
            table: dict[int, list[tuple[int, Link]]] = {}
            for out, link in plan.links:
                table.setdefault(link.stored, []).append((out, link))
            self._by_stored = table
        return self._by_stored

    def identity(self, plan: LoadPlan) -> dict[int, int]:
        """Stored tensor -> the output that is that tensor itself (see identity_output)."""
        if self._identity is None:
            table = {}
            for stored, pairs in self.links_by_stored(plan).items():
                out, link = pairs[0]
                if len(pairs) == 1 and _covers(link, plan.tensors[stored], plan.outputs[out]):
                    table[stored] = out
            self._identity = table
        return self._identity

    def seed_identity(self, identity: dict[int, int]) -> None:
        """Take the identity table a decoder already knows (no walk over every tensor)."""
        self._identity = identity


tables: Beside[LoadPlan, PlanTables] = Beside(lambda _plan: PlanTables())
"""The :class:`PlanTables` of a plan (by object identity; dropped with the plan)."""
