"""Storage: positioned reads of checkpoint bytes into caller buffers, and reusable staging arenas.

Used by reader ranks. Reads use ``os.preadv`` into preallocated memory (no whole-file loads and
no reliance on mmap page faults, which are slow on network filesystems), split into blocks
issued from a small thread pool so several requests are in flight at once.

Two read paths, chosen per block: a block the page cache holds (``cachestat``,
``distload.residency``) is read through it (one kernel copy, no disk); any other block of a
file that accepts ``O_DIRECT`` is read with ``O_DIRECT`` -- a DMA from the disk into an
aligned bounce buffer of the read thread, then one copy into its target. The page cache's
own work (allocating, inserting and reclaiming a page per 4 KiB) is what a buffered cold read
costs most: 0.8-1.3 CPU s per GB here against 0.2 with ``O_DIRECT`` and the copy. Files that
refuse ``O_DIRECT`` (some network filesystems) are read buffered.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import mmap
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distload.errors import CheckpointError
from distload.index import FileMeta
from distload.locate import safe_member
from distload.residency import cached_range

log = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 8 * 1024 * 1024
# positioned reads in flight per reader: 4 on small machines, 8 from 16 cores up (measured on an
# H100 host with 16 cores: 8 threads read 30 % faster than 4, 16 no faster than 8)
DEFAULT_READ_THREADS = max(4, min(8, (os.cpu_count() or 1) // 2))
# buffers one preadv may fill (the system's IOV_MAX, commonly 1024)
IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16))
# hint the kernel (POSIX_FADV_WILLNEED) about the next bucket's ranges while reading this one
ADVISE_AHEAD = True
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


def direct_block(budget: int | None, threads: int) -> int:
    """Bytes of one O_DIRECT request when all ``threads`` bounce buffers (a request plus an
    aligned block on each side) share ``budget`` bytes (None: no bound); 0: too tight."""
    if budget is None:
        return DIRECT_BLOCK_BYTES
    share = budget // max(1, threads) - 2 * DIRECT_ALIGN
    block = min(DIRECT_BLOCK_BYTES, share - share % DIRECT_ALIGN)
    return block if block >= DIRECT_MIN_BLOCK_BYTES else 0


def byte_view(tensor: torch.Tensor) -> memoryview:
    """Writable flat byte memoryview over a contiguous CPU tensor (no copy)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    if tensor.dim() == 0 or tensor.numel() == 0:
        tensor = tensor.reshape(-1)
    # a contiguous tensor viewed as bytes (its last dim scaled by the item size), cast to one
    # flat dim: the cheapest route (called once per tensor read straight into a destination)
    array: Any = tensor.view(torch.uint8).numpy()  # a buffer (numpy's stubs do not say so)
    return memoryview(array).cast("B")


@dataclass(frozen=True)
class ReadRequest:
    """Read ``len(target)`` bytes of ``file`` at ``offset`` into ``target``."""

    file: str  # relative to the checkpoint root
    offset: int
    target: memoryview
    tensor: str  # for error messages


def open_file_budget() -> int:
    """How many checkpoint files one reader keeps open: an eighth of the process's soft
    open-file limit (the rest is the job's: sockets, shared memory, its own files), between
    16 and 1024."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - platforms without the limit
        return 256
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 8))


class FileReader:
    """Reads byte ranges of the checkpoint's files. Runs on reader ranks (any thread).

    Files stay open between reads, at most :func:`open_file_budget` of them at once (the
    least recently used are closed first, never one a read in flight uses), so checkpoints
    of more shards than the process's open-file limit load; call :meth:`close` at the end
    (or use it as a context manager). :meth:`read` and :meth:`advise` are called from one
    thread at a time (the read-ahead thread); the reads themselves run on a pool.

    ``direct``: read blocks the page cache does not hold with ``O_DIRECT`` (see the module
    docstring), except from the files of ``resident`` (known to be cached: always buffered),
    with bounce buffers of at most ``bounce_budget`` bytes in all (None: no bound; too small
    a budget reads buffered).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        threads: int = DEFAULT_READ_THREADS,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        contain: str | os.PathLike[str] | None = None,
        expect: Mapping[str, FileMeta] | None = None,
        direct: bool = True,
        resident: Collection[str] = (),
        bounce_budget: int | None = None,
    ) -> None:
        self.root = Path(root)
        # file -> what the plan was made from: each file is checked when first opened
        self.expect = dict(expect or {})
        self.contain = Path(contain) if contain is not None else None
        self.block_bytes = max(4096, block_bytes)
        self._fds: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._busy: set[str] = set()  # files the read in flight uses: never closed meanwhile
        self.max_open = open_file_budget()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="distload-read")
        self.direct_block = direct_block(bounce_budget, threads)
        self.direct = direct and hasattr(os, "O_DIRECT") and self.direct_block > 0
        self.resident = frozenset(resident)
        # file -> its O_DIRECT descriptor, None where refused (opened beside the buffered one)
        self._direct_fds: dict[str, int | None] = {}
        self._local = threading.local()  # each read thread's bounce buffer
        self._bounces: list[mmap.mmap] = []
        self.bounce_bytes = 0  # memory of the bounce buffers made (part of the staging)
        self.bytes_read = 0
        # bytes read through the page cache: the kernel copies each of them once (a read
        # that bypasses the cache, O_DIRECT, is a DMA and counts 0)
        self.bytes_kernel_copied = 0
        self.bytes_direct = 0  # bytes read with O_DIRECT (a DMA)
        self.bytes_bounced = 0  # of them, bytes this rank copied out of a bounce buffer

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is not None:
                self._fds.move_to_end(file)
            else:
                self._close_idle(self.max_open - 1)
                path = safe_member(self.root, file, where=str(self.root), contain=self.contain)
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                if ADVISE_AHEAD and hasattr(os, "posix_fadvise"):
                    # reads are large and their next ranges are announced (advise): no
                    # kernel read-ahead past them into bytes other readers fetch (nor, from
                    # the header check below, into bytes read with O_DIRECT)
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                try:
                    self._check_identity(fd, file)
                except BaseException:
                    os.close(fd)
                    raise
                self._fds[file] = fd
                if self.direct and file not in self.resident:
                    self._direct_fds[file] = _open_direct(path)
            return fd

    def _direct_fd(self, file: str) -> int | None:
        """The O_DIRECT descriptor of an open ``file`` (None: buffered reads only)."""
        with self._lock:
            return self._direct_fds.get(file)

    def _refuse_direct(self, file: str, fd: int) -> None:
        """``file`` turned out to refuse O_DIRECT reads: read it buffered from now on."""
        with self._lock:
            if self._direct_fds.get(file) == fd:
                self._direct_fds[file] = None
                os.close(fd)
        log.info("%s: O_DIRECT reads refused; reading it through the page cache", file)

    def fd(self, file: str) -> int:
        """An open descriptor of ``file``, checked against the plan (it may be closed later to
        stay within the open-file budget: map or duplicate it to keep it)."""
        return self._fd(file)

    def _close_idle(self, keep: int) -> None:
        """Close least recently used files until at most ``keep`` stay open (files of the
        read in flight excepted). Called with the lock held."""
        for name in list(self._fds):
            if len(self._fds) <= keep:
                return
            if name not in self._busy:
                os.close(self._fds.pop(name))
                direct = self._direct_fds.pop(name, None)
                if direct is not None:
                    os.close(direct)

    def _check_identity(self, fd: int, file: str) -> None:
        """The file opened is the one the plan was made from: same size, same header bytes
        (a shard replaced or rewritten after planning would shift every offset)."""
        meta = self.expect.get(file)
        if meta is None:
            return
        size = os.fstat(fd).st_size
        if size != meta.size:
            raise CheckpointError(
                f"{file}: the file is {size} bytes now but {meta.size} bytes when the load was "
                "planned: it was replaced or rewritten during the load",
                file=file,
            )
        if meta.header_digest:
            head = os.pread(fd, meta.header_bytes, 0)
            if hashlib.sha256(head).hexdigest() != meta.header_digest:
                raise CheckpointError(
                    f"{file}: its header differs from the one the load was planned with (same "
                    f"size, {meta.header_bytes} header bytes): the file was replaced or "
                    "rewritten during the load",
                    file=file,
                )

    def _read_run(
        self, fd: int, offset: int, run: list[tuple[memoryview, str]], file: str
    ) -> tuple[int, int]:
        """Fill the buffers of ``run`` from consecutive bytes of ``file`` starting at
        ``offset``, through the page cache where it holds them, else with O_DIRECT where the
        file allows; returns (bytes read with O_DIRECT, bytes of them copied out of a bounce
        buffer). Runs on a read thread."""
        direct = self._direct_fd(file)
        if direct is not None:
            size = sum(len(view) for view, _ in run)
            if not cached_range(fd, offset, size):  # None (cannot tell): read it direct
                try:
                    return size, self._read_direct(direct, offset, run, file)
                except _DirectRefused:
                    self._refuse_direct(file, direct)
        self._read_buffered(fd, offset, run, file)
        return 0, 0

    def _bounce(self) -> np.ndarray:
        """This read thread's aligned bounce buffer (made on first use, freed by close)."""
        got: np.ndarray | None = getattr(self._local, "bounce", None)
        if got is None:
            size = self.direct_block + 2 * DIRECT_ALIGN
            buf = mmap.mmap(-1, size)  # page aligned
            with self._lock:
                self._bounces.append(buf)
                self.bounce_bytes += size
            got = self._local.bounce = np.frombuffer(buf, dtype=np.uint8)
        return got

    def _read_direct(
        self, fd: int, offset: int, run: list[tuple[memoryview, str]], file: str
    ) -> int:
        """Read ``run`` (at most :attr:`direct_block` bytes) with O_DIRECT; returns the bytes
        copied out of this thread's bounce buffer. Buffers lying back to back in memory at
        the file's alignment (a staging layout mirrors it: ``distload.geometry.slot_offset``)
        take the DMA straight, but for their unaligned ends; any other run is read whole into
        the bounce buffer and copied out (numpy's copy releases the GIL, so the pool's threads
        copy in parallel)."""
        size = sum(len(view) for view, _ in run)
        tensor = run[0][1]
        lo = -(-offset // DIRECT_ALIGN) * DIRECT_ALIGN
        hi = (offset + size) // DIRECT_ALIGN * DIRECT_ALIGN
        straight = _straight(run, offset, size) if hi - lo >= DIRECT_ALIGN else None
        bounce = self._bounce()
        window = memoryview(bounce)  # type: ignore[arg-type]
        if straight is None:
            start = offset - offset % DIRECT_ALIGN
            end = -(-(offset + size) // DIRECT_ALIGN) * DIRECT_ALIGN
            self._pread_direct(
                fd, window[: end - start], start, offset + size - start, file=file, tensor=tensor
            )
            pos = offset - start
            for view, _ in run:
                np.copyto(np.frombuffer(view, dtype=np.uint8), bounce[pos : pos + len(view)])
                pos += len(view)
            return size
        self._pread_direct(
            fd, straight[lo - offset : hi - offset], lo, hi - lo, file=file, tensor=tensor
        )
        if offset < lo:  # the head: the aligned block holding it, through the bounce buffer
            self._pread_direct(
                fd, window[:DIRECT_ALIGN], lo - DIRECT_ALIGN, DIRECT_ALIGN, file=file, tensor=tensor
            )
            head = bounce[offset - (lo - DIRECT_ALIGN) : DIRECT_ALIGN]
            np.copyto(np.frombuffer(straight[: lo - offset], dtype=np.uint8), head)
        if hi < offset + size:  # the tail likewise (the block may end the file)
            tail = offset + size - hi
            self._pread_direct(fd, window[:DIRECT_ALIGN], hi, tail, file=file, tensor=tensor)
            np.copyto(np.frombuffer(straight[hi - offset :], dtype=np.uint8), bounce[:tail])
        return (lo - offset) + (offset + size - hi)

    def _pread_direct(
        self, fd: int, window: memoryview, at: int, need: int, *, file: str, tensor: str
    ) -> None:
        """Fill ``window`` (aligned memory) from aligned offset ``at`` of ``file`` with
        O_DIRECT, at least its first ``need`` bytes (the rest may lie past the end of the
        file); resumed after short reads."""
        got = 0
        while got < need:
            try:
                n = os.preadv(fd, [window[got:]], at + got)
            except OSError as exc:
                if exc.errno == errno.EINVAL and got == 0:
                    raise _DirectRefused from exc  # alignment or O_DIRECT not supported
                raise CheckpointError(
                    f"{file}: read at offset {at + got} failed while reading tensor "
                    f"{tensor!r}: {exc}",
                    file=file,
                    tensor=tensor,
                ) from exc
            got += n
            if got < need and (n == 0 or got % DIRECT_ALIGN):  # stopped at the end of file
                raise CheckpointError(
                    f"{file}: unexpected end of file at byte {at + got} while reading "
                    f"tensor {tensor!r} (file truncated after it was indexed?)",
                    file=file,
                    tensor=tensor,
                )

    def _read_buffered(
        self, fd: int, offset: int, run: list[tuple[memoryview, str]], file: str
    ) -> None:
        """Fill the buffers of ``run`` through the page cache (one ``preadv`` per pass,
        resumed after short reads)."""
        views = [view for view, _ in run]
        names = [name for _, name in run]
        done = 0
        first = 0  # index of the first buffer not yet full
        while first < len(views):
            try:
                n = os.preadv(fd, views[first:], offset + done)
            except OSError as exc:
                raise CheckpointError(
                    f"{file}: read at offset {offset + done} failed while reading tensor "
                    f"{names[first]!r}: {exc}",
                    file=file,
                    tensor=names[first],
                ) from exc
            if n == 0:
                raise CheckpointError(
                    f"{file}: unexpected end of file at byte {offset + done} while reading "
                    f"tensor {names[first]!r} (file truncated after it was indexed?)",
                    file=file,
                    tensor=names[first],
                )
            done += n
            while first < len(views) and n >= len(views[first]):
                n -= len(views[first])
                first += 1
            if n:  # a short read ended inside this buffer: resume after its filled bytes
                views[first] = views[first][n:]

    def _runs(
        self, requests: Sequence[ReadRequest]
    ) -> list[tuple[int, int, list[tuple[memoryview, str]], str]]:
        """Cut requests into blocks of at most ``block_bytes`` and join consecutive file ranges
        (e.g. thousands of small tensors stored back to back) into one ``preadv`` each."""
        runs: list[tuple[int, int, list[tuple[memoryview, str]], str]] = []
        end, size = -1, 0
        for req in requests:
            fd = self._fd(req.file)
            # blocks that may be read with O_DIRECT fit a read thread's bounce buffer
            block = self.direct_block if self._direct_fd(req.file) is not None else self.block_bytes
            total = len(req.target)
            for start in range(0, total, block):
                view = req.target[start : min(total, start + block)]
                where = req.offset + start
                last = runs[-1] if runs else None
                if (
                    last is not None
                    and last[0] == fd
                    and where == end
                    and size + len(view) <= block
                    and len(last[2]) < IOV_MAX
                ):
                    last[2].append((view, req.tensor))
                    size += len(view)
                else:
                    runs.append((fd, where, [(view, req.tensor)], req.file))
                    size = len(view)
                end = where + len(view)
        return runs

    def advise(self, file: str, offset: int, length: int) -> None:
        """Hint that ``[offset, offset + length)`` of ``file`` is read soon, so the kernel starts
        fetching it while the current bucket is read and moved (no-op where unsupported)."""
        if not ADVISE_AHEAD or length <= 0 or not hasattr(os, "posix_fadvise"):
            return
        with contextlib.suppress(OSError, CheckpointError):
            fd = self._fd(file)
            if self._direct_fd(file) is not None:
                return  # read with O_DIRECT: a hint would fill the page cache besides
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)

    def read(self, requests: Sequence[ReadRequest]) -> None:
        """Fill every request's target; blocks until all are read (parallel runs). Requests
        spanning more files than may stay open are read in groups of files, in order."""
        wanted = [r for r in requests if len(r.target)]
        direct = bounced = 0
        group: list[ReadRequest] = []
        files: set[str] = set()
        for req in wanted:
            if req.file not in files and len(files) >= self.max_open:
                d, b = self._read_group(group, files)
                direct, bounced = direct + d, bounced + b
                group, files = [], set()
            group.append(req)
            files.add(req.file)
        if group:
            d, b = self._read_group(group, files)
            direct, bounced = direct + d, bounced + b
        nbytes = sum(len(r.target) for r in wanted)
        self.bytes_read += nbytes
        self.bytes_kernel_copied += nbytes - direct
        self.bytes_direct += direct
        self.bytes_bounced += bounced

    def _read_group(self, requests: list[ReadRequest], files: set[str]) -> tuple[int, int]:
        with self._lock:
            self._busy = files
        try:
            futures = [
                self._pool.submit(self._read_run, fd, offset, run, file)
                for fd, offset, run, file in self._runs(requests)
            ]
            error: BaseException | None = None
            direct = bounced = 0
            for fut in futures:
                try:
                    d, b = fut.result()
                    direct, bounced = direct + d, bounced + b
                except BaseException as exc:  # keep waiting so no thread writes after we return
                    error = error or exc
        finally:
            with self._lock:
                self._busy = set()
        if error is not None:
            if isinstance(error, OSError):
                raise CheckpointError(f"read failed: {error}") from error
            raise error
        return direct, bounced

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for direct in self._direct_fds.values():
                if direct is not None:
                    os.close(direct)
            self._direct_fds.clear()
            bounces, self._bounces = self._bounces, []
        self._local = threading.local()
        for buf in bounces:
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                buf.close()

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


class _DirectRefused(Exception):
    """An O_DIRECT read was refused (EINVAL before any byte): read the file buffered."""


def _open_direct(path: str | os.PathLike[str]) -> int | None:
    """An O_DIRECT descriptor of ``path``, None where the filesystem refuses one."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


class Arenas:
    """Named, reusable staging buffers that grow to the largest size asked of them.

    Each name (e.g. ``"read0"``, ``"recv"``) is one buffer reused for every bucket, so a rank's
    staging memory is the sum of its arenas' sizes, bounded by the plan's bucket size.
    Host arenas are pinned when ``pin`` is set (for fast copies to CUDA), and start on a
    ``DIRECT_ALIGN`` boundary: O_DIRECT reads land pieces straight in them.
    """

    def __init__(self, device: torch.device, *, pin: bool = False) -> None:
        self.device = device
        self.pin = pin and device.type == "cpu" and torch.cuda.is_available()
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` backed by arena ``name`` (contents undefined)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < nbytes:
            self._buffers.pop(name, None)
            if self.device.type == "cpu":  # one aligned block more, to start on a boundary
                raw = torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=self.pin)
                skip = -raw.data_ptr() % DIRECT_ALIGN
                buf = raw[skip : skip + nbytes]
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._buffers[name] = buf
        return buf[:nbytes]

    @property
    def nbytes(self) -> int:
        """Bytes held by all arenas now (their peak, since they never shrink)."""
        return sum(b.numel() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()
