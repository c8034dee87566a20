"""Gather reads: a region of a stored tensor read straight from its file into a destination
region, as runs of contiguous bytes, through the page cache (one kernel copy per byte).

Runs on every rank of a one-node load for the page-cached shared buckets
(``distload.execute.pagecache``). A region that is whole rows of a row-major tensor
(replicated, ``Shard(0)``) is one run: one ``preadv`` straight into the destination, against
copying out of a mapping of the file about half the CPU time (no page-table work to map and
unmap every page). A column block (``Shard(1)``) is one run per row; runs close together are
joined into one call, the bytes between them read into a small scratch buffer, but only where
that gap is small next to the run (:data:`MAX_GAP_SHARE`): the kernel reads every byte of a
gap from memory, and four ranks each reading a whole tensor for a quarter of its columns cost
more memory traffic than four copies of their quarter out of mappings (measured on 4
processes, 2 cores: 0.28 s against 0.22 s), so such regions are left to the mapping
(:func:`runs_of` returns None).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np
import torch

from distload.errors import CheckpointError
from distload.storage import IOV_MAX

# a gap between two runs up to this many bytes (and MAX_GAP_SHARE of a run) is read into
# scratch, in the same call; a larger one starts another call
GAP_BYTES = 32 * 1024
MAX_GAP_SHARE = 0.25
# runs from this size on are worth a call each, whatever lies between them (a system call
# costs about what copying a few KiB does)
CALL_RUN_BYTES = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_preadv = getattr(_libc, "preadv", None)
if _preadv is not None:
    _preadv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64)
    _preadv.restype = ctypes.c_ssize_t


def supported() -> bool:
    """Whether this platform has ``preadv`` (Linux and the BSDs do)."""
    return _preadv is not None


@dataclass(frozen=True)
class Runs:
    """Where contiguous runs of bytes lie: file offsets, destination addresses and lengths,
    one per run (file offsets ascending), and the destinations they point into (held, so
    the addresses stay valid as long as the runs live)."""

    offsets: np.ndarray  # int64 file offsets
    addrs: np.ndarray  # uint64 destination addresses
    lengths: np.ndarray  # int64 bytes
    keep: tuple[torch.Tensor, ...]
    names: tuple[str, ...] = ()  # the tensor of each run, for errors (default: the caller's)

    @staticmethod
    def of_tensors(pieces: list[tuple[int, torch.Tensor, str]]) -> Runs:
        """Runs filling whole contiguous CPU tensors, each from its file offset (e.g. the
        pieces of a bucket of whole tensors, back to back in the file), with their names."""
        pieces = sorted(pieces, key=lambda p: p[0])
        return Runs(
            np.array([off for off, _, _ in pieces], np.int64),
            np.array([t.data_ptr() for _, t, _ in pieces], np.uint64),
            np.array([t.numel() * t.element_size() for _, t, _ in pieces], np.int64),
            tuple(t for _, t, _ in pieces),
            tuple(name for _, _, name in pieces),
        )

    def name_at(self, offset: int, default: str) -> str:
        """The tensor whose run holds file byte ``offset`` (``default`` without names)."""
        if not self.names:
            return default
        i = int(np.searchsorted(self.offsets, offset, side="right")) - 1
        return self.names[max(0, min(i, len(self.names) - 1))]


@dataclass
class GatherStats:
    """What gather reads cost this rank: bytes delivered, and bytes the kernel copied into
    scratch (the gaps between runs)."""

    delivered: int = 0
    gap: int = 0
    calls: int = 0


def worth_gathering(
    shape: tuple[int, ...], box: tuple[tuple[int, int], ...], itemsize: int
) -> bool:
    """Whether region ``box`` of a row-major tensor of ``shape`` is runs that pay as gather
    reads (:func:`runs_of`'s rule on the file side, from the geometry alone: no views)."""
    if not box:
        return True
    inner = 1  # elements of the full dims after the last partial one
    j = len(shape) - 1
    while j >= 0 and box[j] == (0, shape[j]):
        inner *= shape[j]
        j -= 1
    if j < 0 or all(b - a == 1 for a, b in box[:j]):
        return True  # the region is one run
    run = (box[j][1] - box[j][0]) * inner * itemsize
    gap = (shape[j] - (box[j][1] - box[j][0])) * inner * itemsize
    return run >= CALL_RUN_BYTES or gap <= min(GAP_BYTES, MAX_GAP_SHARE * run)


def _squeeze(
    shape: tuple[int, ...], *strides: tuple[int, ...]
) -> tuple[list[int], list[list[int]]]:
    """Drop dims of size 1 (their strides mean nothing)."""
    keep = [i for i, n in enumerate(shape) if n != 1]
    return [shape[i] for i in keep], [[s[i] for i in keep] for s in strides]


def runs_of(
    file_offset: int,
    src: torch.Tensor,
    dest: torch.Tensor,
) -> Runs | None:
    """The runs that carry region ``src`` of a stored piece into region ``dest``.

    ``src`` is a view of a meta tensor of the piece's shape and stored dtype (its storage
    offset and strides place the region in the piece, whose first byte is at
    ``file_offset``); ``dest`` is the destination region, a CPU tensor view of the same
    shape and dtype. None when gather reads do not pay for it (runs under
    :data:`CALL_RUN_BYTES` apart by more than :data:`MAX_GAP_SHARE` of a run) or cannot take
    it (a shape or dtype mismatch): the caller copies it another way."""
    if src.shape != dest.shape or src.dtype != dest.dtype or dest.device.type != "cpu":
        return None
    size = src.element_size()
    if src.numel() == 0:
        return Runs(np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.int64), (dest,))
    shape, (s_str, d_str) = _squeeze(tuple(src.shape), tuple(src.stride()), tuple(dest.stride()))
    # the longest suffix of dims over which both regions are contiguous is one run
    k, run = len(shape), 1
    while k > 0:
        n = shape[k - 1]
        if s_str[k - 1] != run or d_str[k - 1] != run:
            break
        run *= n
        k -= 1
    run_bytes = run * size
    if k > 0 and run_bytes < CALL_RUN_BYTES:  # rows of a column block: gaps between them
        gap = (s_str[k - 1] - run) * size  # from one run to the next along the innermost dim
        if gap > min(GAP_BYTES, MAX_GAP_SHARE * run_bytes):
            return None
    src_off = np.zeros(1, np.int64)
    dst_off = np.zeros(1, np.int64)
    for n, ss, ds in zip(shape[:k], s_str[:k], d_str[:k], strict=True):
        idx = np.arange(n, dtype=np.int64)
        src_off = (src_off[:, None] + idx[None, :] * ss).reshape(-1)
        dst_off = (dst_off[:, None] + idx[None, :] * ds).reshape(-1)
    offsets: np.ndarray = (int(src.storage_offset()) + src_off) * size + file_offset
    addrs = (dest.data_ptr() + dst_off * size).astype(np.uint64)
    storage = dest.untyped_storage()
    low, high = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    if int(addrs.min()) < low or int(addrs.max()) + run_bytes > high:  # never: a bad stride
        raise ValueError(f"runs of a {tuple(dest.shape)} region fall outside its storage")
    if not np.all(offsets[:-1] <= offsets[1:]):  # (row-major regions come sorted)
        order = np.argsort(offsets, kind="stable")
        offsets, addrs = offsets[order], addrs[order]
    lengths = np.full(len(offsets), run_bytes, np.int64)
    return Runs(offsets.astype(np.int64), addrs, lengths, (dest,))


def _iovecs(runs: Runs, scratch: int) -> list[tuple[int, np.ndarray, int]]:
    """``(file offset, iovec array, bytes)`` per ``preadv`` call: the runs, and between two
    runs of one call the gap as a scratch buffer."""
    n, lengths = len(runs.offsets), runs.lengths
    if n == 0:
        return []
    gaps = runs.offsets[1:] - (runs.offsets[:-1] + lengths[:-1])
    if np.any(gaps < 0):
        raise ValueError("overlapping runs")
    # run i and i + 1 in one call when the gap is small, also next to the runs
    joined = gaps <= np.minimum(GAP_BYTES, MAX_GAP_SHARE * np.maximum(lengths[:-1], lengths[1:]))
    iov = np.zeros((2 * n - 1, 2), dtype=np.uint64)
    iov[0::2, 0] = runs.addrs
    iov[0::2, 1] = lengths
    iov[1::2, 0] = scratch
    iov[1::2, 1] = np.where(joined, gaps, 0)
    calls: list[tuple[int, np.ndarray, int]] = []
    breaks = np.flatnonzero(~joined) + 1  # runs that start a new call
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [n]))
    per_call = (IOV_MAX + 1) // 2  # runs per call (a run and its gap: two buffers)
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        for lo in range(a, b, per_call):
            hi = min(b, lo + per_call)
            chunk = iov[2 * lo : 2 * hi - 1]
            calls.append((int(runs.offsets[lo]), chunk, int(chunk[:, 1].sum())))
    return calls


def gather(fd: int, runs: Runs, stats: GatherStats, *, file: str, tensor: str = "") -> None:
    """Read every run of ``runs`` from ``fd`` into its destination; short reads are resumed,
    errors name the file and the tensor (the run's, else ``tensor``)."""
    if _preadv is None:  # pragma: no cover - callers check supported() first
        raise RuntimeError("gather reads need preadv")
    preadv = _preadv
    scratch = np.empty(GAP_BYTES, dtype=np.uint8)
    base = scratch.ctypes.data
    copied = 0
    for offset, call, total in _iovecs(runs, base):
        done, first, iov = 0, 0, call.copy()
        while done < total:
            got = preadv(fd, iov[first:].ctypes.data, len(iov) - first, offset + done)
            if got <= 0:
                name = runs.name_at(offset + done, tensor)
            if got < 0:
                err = ctypes.get_errno()
                raise CheckpointError(
                    f"{file}: read at offset {offset + done} failed while reading tensor "
                    f"{name!r}: {os.strerror(err)}",
                    file=file,
                    tensor=name,
                )
            if got == 0:
                raise CheckpointError(
                    f"{file}: unexpected end of file at byte {offset + done} while reading "
                    f"tensor {name!r} (file truncated after it was indexed?)",
                    file=file,
                    tensor=name,
                )
            done += got
            while first < len(iov) and got >= int(iov[first, 1]):
                got -= int(iov[first, 1])
                first += 1
            if got:  # a short read ended inside this buffer: resume after its filled bytes
                iov[first, 0] += got
                iov[first, 1] -= got
        stats.calls += 1
        copied += total
    delivered = int(runs.lengths.sum())
    stats.delivered += delivered
    stats.gap += copied - delivered
