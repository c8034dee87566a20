"""O_DIRECT reads for :class:`~distload.storage.FileReader`: alignment, bounce buffers, DMA.

Used by reader ranks, on the read pool's threads. A run of consecutive file bytes is read
with one aligned ``O_DIRECT`` request (a DMA from the disk, no page-cache work): straight
into its buffers when they lie back to back in memory at the file's alignment (a staging
layout mirrors the file: ``distload.geometry.slot_offset``) but for their unaligned ends, else
into the read thread's bounce buffer and copied out once (numpy's copy releases the GIL, so
the pool's threads copy in parallel).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading

import numpy as np

from distload.errors import CheckpointError

# O_DIRECT reads: file offsets, lengths and memory aligned to this (the strictest common
# requirement; statx's dio_offset_align is 512 on many disks), in requests of at most
# DIRECT_BLOCK_BYTES (each read thread's bounce buffer, within the staging budget: see
# direct_block). 2 MiB requests, 4 in flight, read as fast as 8 MiB ones on a 2-core VM's
# disk for less memory (1.9-2.2 GB/s against 1.4-2.2).
DIRECT_ALIGN = 4096
DIRECT_BLOCK_BYTES = 2 * 1024 * 1024
# smaller blocks than this are not worth a direct read: a staging budget this tight reads
# buffered
DIRECT_MIN_BLOCK_BYTES = 64 * 1024


def _down(offset: int) -> int:
    """``offset`` rounded down to ``DIRECT_ALIGN``."""
    return offset - offset % DIRECT_ALIGN


def _up(offset: int) -> int:
    """``offset`` rounded up to ``DIRECT_ALIGN``."""
    return -(-offset // DIRECT_ALIGN) * DIRECT_ALIGN


def direct_block(budget: int | None, threads: int) -> int:
    """Bytes of one O_DIRECT request when all ``threads`` bounce buffers (a request plus an
    aligned block on each side) share ``budget`` bytes (None: no bound); 0: too tight."""
    if budget is None:
        return DIRECT_BLOCK_BYTES
    share = budget // max(1, threads) - 2 * DIRECT_ALIGN
    block = min(DIRECT_BLOCK_BYTES, _down(share))
    return block if block >= DIRECT_MIN_BLOCK_BYTES else 0


class DirectRefused(Exception):
    """An O_DIRECT read was refused (EINVAL before any byte): read the file buffered."""


def open_direct(path: str | os.PathLike[str]) -> int | None:
    """An O_DIRECT descriptor of ``path``, None where the filesystem refuses one."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


class BounceBuffers:
    """One page-aligned bounce buffer per read thread, of one block and an aligned block on
    each side, made on first use; :attr:`nbytes` counts what was made (staging)."""

    def __init__(self, block: int) -> None:
        self.size = block + 2 * DIRECT_ALIGN
        self._local = threading.local()
        self._lock = threading.Lock()
        self._made: list[mmap.mmap] = []
        self.nbytes = 0

    def get(self) -> np.ndarray:
        """This thread's buffer."""
        got: np.ndarray | None = getattr(self._local, "buffer", None)
        if got is None:
            raw = mmap.mmap(-1, self.size)  # page aligned
            with self._lock:
                self._made.append(raw)
                self.nbytes += self.size
            got = self._local.buffer = np.frombuffer(raw, dtype=np.uint8)
        return got

    def close(self) -> None:
        """Free the buffers (after the pool's threads have ended)."""
        with self._lock:
            made, self._made = self._made, []
        self._local = threading.local()
        for raw in made:
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                raw.close()


def read_direct(
    fd: int, offset: int, run: list[tuple[memoryview, str]], bounce: np.ndarray, *, file: str
) -> int:
    """Read ``run`` (buffers filled from consecutive bytes of ``file`` at ``offset``, at most
    one bounce buffer's block) through O_DIRECT descriptor ``fd``; returns the bytes copied out
    of ``bounce`` (see the module docstring)."""
    size = sum(len(view) for view, _ in run)
    tensor = run[0][1]
    lo, hi = _up(offset), _down(offset + size)  # the aligned middle
    straight = _straight(run, offset, size) if hi - lo >= DIRECT_ALIGN else None
    window = memoryview(bounce)  # type: ignore[arg-type]
    if straight is None:
        start, end = _down(offset), _up(offset + size)  # the aligned span holding the run
        pread_direct(
            fd, window[: end - start], start, offset + size - start, file=file, tensor=tensor
        )
        pos = offset - start
        for view, _ in run:
            np.copyto(np.frombuffer(view, dtype=np.uint8), bounce[pos : pos + len(view)])
            pos += len(view)
        return size
    pread_direct(fd, straight[lo - offset : hi - offset], lo, hi - lo, file=file, tensor=tensor)
    if offset < lo:  # the head: the aligned block holding it, through the bounce buffer
        pread_direct(
            fd, window[:DIRECT_ALIGN], lo - DIRECT_ALIGN, DIRECT_ALIGN, file=file, tensor=tensor
        )
        head = bounce[offset - (lo - DIRECT_ALIGN) : DIRECT_ALIGN]
        np.copyto(np.frombuffer(straight[: lo - offset], dtype=np.uint8), head)
    if hi < offset + size:  # the tail likewise (the block may end the file)
        tail = offset + size - hi
        pread_direct(fd, window[:DIRECT_ALIGN], hi, tail, file=file, tensor=tensor)
        np.copyto(np.frombuffer(straight[hi - offset :], dtype=np.uint8), bounce[:tail])
    return (lo - offset) + (offset + size - hi)


def pread_direct(
    fd: int, window: memoryview, at: int, need: int, *, file: str, tensor: str
) -> None:
    """Fill ``window`` (aligned memory) from aligned offset ``at`` of ``file`` with O_DIRECT,
    at least its first ``need`` bytes (the rest may lie past the end of the file); resumed
    after short reads."""
    got = 0
    while got < need:
        try:
            n = os.preadv(fd, [window[got:]], at + got)
        except OSError as exc:
            if exc.errno == errno.EINVAL and got == 0:
                raise DirectRefused from exc  # alignment or O_DIRECT not supported
            raise CheckpointError(
                f"{file}: read at offset {at + got} failed while reading tensor {tensor!r}: {exc}",
                file=file,
                tensor=tensor,
            ) from exc
        got += n
        if got < need and (n == 0 or got % DIRECT_ALIGN):  # stopped at the end of file
            raise CheckpointError(
                f"{file}: unexpected end of file at byte {at + got} while reading tensor "
                f"{tensor!r} (file truncated after it was indexed?)",
                file=file,
                tensor=tensor,
            )


def _straight(run: list[tuple[memoryview, str]], offset: int, size: int) -> memoryview | None:
    """The memory of ``run``'s buffers as one view when they lie back to back at an address
    congruent to the file ``offset`` modulo ``DIRECT_ALIGN`` (an O_DIRECT read can then fill
    their aligned middle itself); None otherwise."""
    base = np.frombuffer(run[0][0], dtype=np.uint8).ctypes.data
    if (base - offset) % DIRECT_ALIGN:
        return None
    if len(run) == 1:
        return run[0][0]
    at = base
    for view, _ in run:
        if np.frombuffer(view, dtype=np.uint8).ctypes.data != at:
            return None
        at += len(view)
    return memoryview((ctypes.c_char * size).from_address(base)).cast("B")
