"""Shared buckets of files already in every node's page cache: each rank reads its own parts
straight from the file into its destinations (``distload.execute.gather``: one kernel copy
per byte it keeps, plus the gaps between a column block's rows), instead of a reader reading
the bucket and serving it -- through a shared-memory slot on one node (two copies, and a
slot), over the network between nodes.

Runs on every rank, for the buckets :func:`page_cached` names: those of
:meth:`~distload.plan.LoadPlan.cached_buckets` (the files every node holds:
``distload.residency``) on a host-memory transport. No collective runs inside such a bucket;
a failure is kept for the next status check. Parts that need a cast, a transpose or are
scattered in runs too short to be buffers of their own are copied from a read-only mapping of
the file instead. A page that left the cache since is read back by the first rank asking for
it: the bytes are the same, only slower. Files are opened through the :class:`FileReader`, so
each is checked against the plan (size, header digest) before any byte of it is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os

import torch

from distload.dtypes import to_torch
from distload.execute.copies import Copier, region
from distload.execute.gather import (
    GatherStats,
    Runs,
    gather,
    runs_of,
    supported,
    worth_gathering,
)
from distload.execute.reader import Read
from distload.execute.status import ExecStats, Status
from distload.geometry import Segment, piece_bytes, piece_offset, piece_shape, read_slots
from distload.plan import Bucket, Item, LoadPlan
from distload.storage import FileReader


def page_cached(plan: LoadPlan, device: torch.device, *, shm: bool) -> frozenset[int]:
    """The shared buckets every rank reads from the page cache itself, the same on every rank:
    the plan's :meth:`~distload.plan.LoadPlan.cached_buckets` when the transport works in
    host memory (a CUDA transport moves every bucket itself, from pinned staging), on one
    node only alongside shared memory (``shm=False`` asks for the transport there)."""
    if device.type != "cpu" or not (shm or len(set(plan.nodes)) > 1):
        return frozenset()
    return plan.cached_buckets()


class FileMaps:
    """The checkpoint's files as this rank reads them for page-cached buckets: a descriptor
    of each (checked against the plan when first opened, kept until :meth:`close`), and
    read-only (copy-on-write, never written) mappings for the parts gather reads cannot
    take, made on first use. ``gathered`` counts what the gather reads cost."""

    def __init__(self, reader: FileReader) -> None:
        self.reader = reader
        self._maps: dict[str, tuple[mmap.mmap, torch.Tensor]] = {}
        self._fds: dict[str, int] = {}
        self.gathered = GatherStats()

    def fd(self, file: str) -> int:
        """This rank's descriptor of ``file`` (a duplicate of the reader's, so the reader's
        open-file budget cannot close it under a read)."""
        fd = self._fds.get(file)
        if fd is None:
            fd = os.dup(self.reader.fd(file))  # opened and checked against the plan
            self._fds[file] = fd
        return fd

    def bytes_of(self, file: str) -> torch.Tensor:
        """The whole file as a uint8 tensor over its mapping."""
        got = self._maps.get(file)
        if got is None:
            mapping = mmap.mmap(self.fd(file), 0, access=mmap.ACCESS_COPY)
            got = (mapping, torch.frombuffer(mapping, dtype=torch.uint8))
            self._maps[file] = got
        return got[1]

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for mapping, tensor in maps.values():
            del tensor
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                mapping.close()
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def copy_from_page_cache(copier: Copier, number: int, bucket: Bucket, maps: FileMaps) -> int:
    """Read this rank's parts of shared bucket ``number`` from its files into its
    destinations; returns the bytes this rank took (0: it needs nothing from the bucket)."""
    plan = copier.plan
    tensors = plan.tensors
    gathers = supported()  # without preadv every part comes from the mappings
    whole = (
        copier.whole_layout(bucket, everyone=True)
        if bucket.kind == "broadcast" and gathers
        else None
    )
    if whole is not None:
        by_file: dict[str, list[tuple[int, torch.Tensor, str]]] = {}
        for piece in whole.pieces:
            meta = tensors[piece.item.tensor]
            start = piece_offset(meta, piece.item)
            by_file.setdefault(meta.file, []).append((start, piece.dest, meta.name))
        for file, pieces in by_file.items():
            gather(maps.fd(file), Runs.of_tensors(pieces), maps.gathered, file=file)
        return whole.size
    segs, size = copier.segments(number, copier.rank)
    if not segs:
        return 0
    read = Read(bucket)
    by_item: dict[Item, list[Segment]] = {}
    for seg in segs:
        by_item.setdefault(seg.item, []).append(seg)
    for item, parts in by_item.items():
        if gathers and _gather_item(copier, item, parts, maps):
            read.direct.add(item)
    if len(read.direct) < len(by_item):  # the rest from mappings of the files
        slots, _ = read_slots(plan, bucket)
        for s in slots:
            if s.item in by_item and s.item not in read.direct:
                meta = tensors[s.item.tensor]
                read.slots[s.item] = dataclasses.replace(s, offset=piece_offset(meta, s.item))
                read.buffers[s.item] = maps.bytes_of(meta.file)
        copier.own_parts(number, read)
    return size


def _gather_item(copier: Copier, item: Item, segs: list[Segment], maps: FileMaps) -> bool:
    """Read every part of piece ``item`` this rank holds (``segs``) straight into its
    destinations; False (nothing read) when some part cannot be (a cast, a transpose,
    runs too short), so the caller copies the piece's parts another way."""
    meta = copier.plan.tensors[item.tensor]
    try:
        dtype = to_torch(meta.dtype)
    except (KeyError, ValueError):
        return False
    shape = piece_shape(meta, item)
    if not all(worth_gathering(shape, s.part.src, meta.itemsize) for s in segs):
        return False  # (cheap: decided from the boxes, before any view is made)
    piece = torch.empty(shape, dtype=dtype, device="meta")
    start = piece_offset(meta, item)
    todo: list[Runs] = []
    for seg in segs:
        dest = copier.dests.get(seg.part.output)
        if dest is None:
            continue
        if seg.part.transposed or dest.device.type != "cpu":
            return False
        runs = runs_of(start, region(piece, seg.part.src), region(dest, seg.part.dst))
        if runs is None:
            return False
        todo.append(runs)
    fd = maps.fd(meta.file)
    for runs in todo:
        gather(fd, runs, maps.gathered, file=meta.file, tensor=meta.name)
    return True


def bucket_bytes(copier: Copier, bucket: Bucket) -> int:
    """Stored bytes of a bucket (what its reader accounts as read)."""
    tensors = copier.plan.tensors
    return sum(piece_bytes(tensors[i.tensor], i) for i in bucket.items)


class PageCacheBuckets:
    """This rank's side of the page-cached buckets (main thread): its parts read from its own
    descriptors and mappings (:class:`FileMaps`, closed by :meth:`close`). The bucket's
    reader counts it as read (the page cache filled once per job); nothing counts as sent or
    received, since nothing moves between ranks (``distload.accounting.traffic`` alike)."""

    def __init__(self, copier: Copier, status: Status, stats: ExecStats, reader: FileReader):
        self.copier, self.status, self.stats = copier, status, stats
        self.rank = copier.rank
        self.maps = FileMaps(reader)
        self.bytes_read = 0  # stored bytes of the page-cached buckets this rank is reader of

    @property
    def bytes_kernel_copied(self) -> int:
        """What this rank's gather reads made the kernel copy (kept bytes and gaps)."""
        return self.maps.gathered.delivered + self.maps.gathered.gap

    def bucket(self, number: int, bucket: Bucket) -> None:
        """Read this rank's parts of page-cached bucket ``number``; a failure is kept in
        ``status`` for the next status check (no peer waits on this rank here)."""
        if bucket.reader == self.rank:
            self.bytes_read += bucket_bytes(self.copier, bucket)
        if self.status.failed:
            return  # this rank failed: its copies are moot
        try:  # open the files (each checked against the plan): this rank's reads
            for file in {self.copier.plan.tensors[i.tensor].file for i in bucket.items}:
                self.maps.fd(file)
        except Exception as exc:
            self.status.keep(exc, "read")
            return
        self.status.guard(lambda: copy_from_page_cache(self.copier, number, bucket, self.maps))

    def close(self) -> None:
        self.maps.close()
