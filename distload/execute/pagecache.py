"""Shared buckets of files already in the page cache: each rank copies its own parts from a
mapping of the file (one CPU copy per byte it keeps), instead of its reader reading the bucket
into a shared-memory slot and every rank copying out of that (two).

Runs on every rank of a one-node load with shared memory, for the buckets
:meth:`~distload.plan.LoadPlan.cached_buckets` names (rank 0 found their file resident when
planning). A page that left the cache since is read back by the first rank touching it: the
bytes are the same, only slower. Files are opened through the :class:`FileReader`, so each is
checked against the plan (size, header digest) before any byte of it is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap

import torch

from distload.execute.copies import Copier
from distload.execute.reader import Read
from distload.geometry import piece_bytes, piece_offset, read_slots
from distload.plan import Bucket
from distload.storage import FileReader, byte_view


class FileMaps:
    """Read-only (copy-on-write, never written) mappings of the checkpoint's files, one per
    file, made on first use and dropped by :meth:`close`."""

    def __init__(self, reader: FileReader) -> None:
        self.reader = reader
        self._maps: dict[str, tuple[mmap.mmap, torch.Tensor]] = {}

    def bytes_of(self, file: str) -> torch.Tensor:
        """The whole file as a uint8 tensor over its mapping."""
        got = self._maps.get(file)
        if got is None:
            fd = self.reader.fd(file)  # opened and checked against the plan
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            got = (mapping, torch.frombuffer(mapping, dtype=torch.uint8))
            self._maps[file] = got
        return got[1]

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for mapping, tensor in maps.values():
            del tensor
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                mapping.close()


def copy_from_page_cache(copier: Copier, number: int, bucket: Bucket, maps: FileMaps) -> int:
    """Copy this rank's parts of shared bucket ``number`` out of its files' mappings; returns
    the bytes this rank took (0: it needs nothing from the bucket)."""
    plan = copier.plan
    tensors = plan.tensors
    whole = copier.whole_layout(bucket, everyone=True) if bucket.kind == "broadcast" else None
    if whole is not None:
        for piece in whole.pieces:
            meta = tensors[piece.item.tensor]
            start = piece_offset(meta, piece.item)
            mapped = byte_view(maps.bytes_of(meta.file))
            byte_view(piece.dest)[:] = mapped[start : start + piece.nbytes]
            copier.copied += piece.nbytes
        return whole.size
    segs, size = copier.segments(number, copier.rank)
    if not segs:
        return 0
    slots, _ = read_slots(plan, bucket)
    read = Read(bucket)
    for s in slots:
        meta = tensors[s.item.tensor]
        read.slots[s.item] = dataclasses.replace(s, offset=piece_offset(meta, s.item))
        read.buffers[s.item] = maps.bytes_of(meta.file)
    copier.own_parts(number, read)
    return size


def bucket_bytes(copier: Copier, bucket: Bucket) -> int:
    """Stored bytes of a bucket (what its reader accounts as read)."""
    tensors = copier.plan.tensors
    return sum(piece_bytes(tensors[i.tensor], i) for i in bucket.items)
