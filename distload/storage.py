"""Storage: positioned reads of checkpoint bytes into caller buffers.

Used by reader ranks. Reads use ``os.preadv`` into preallocated memory (no whole-file loads and
no reliance on mmap page faults, which are slow on network filesystems), split into blocks
issued from a small thread pool so several requests are in flight at once.

Two read paths, chosen per block: a block the page cache holds (``cachestat``,
``distload.residency``) is read through it (one kernel copy, no disk); any other block of a
file that accepts ``O_DIRECT`` is read with ``O_DIRECT`` (``distload.directio``) -- a DMA
from the disk straight into a staging buffer laid out like the file, or into an aligned
bounce buffer of the read thread and then copied once into its target. The page cache's own
work (allocating, inserting and reclaiming a page per 4 KiB) is what a buffered cold read
costs most: 0.8-1.3 CPU s per GB on a 2-core VM against 0.2 with ``O_DIRECT`` and the copy.
Files that refuse ``O_DIRECT`` (some network filesystems) are read buffered.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distload.directio import (
    BounceBuffers,
    DirectRefused,
    direct_block,
    open_direct,
    read_direct,
)
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
        # threads=0: every read on the calling thread, one after another (no pool)
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="distload-read") if threads > 0 else None
        )
        self.direct_block = direct_block(bounce_budget, max(1, threads))
        self.direct = direct and hasattr(os, "O_DIRECT") and self.direct_block > 0
        self.resident = frozenset(resident)
        # file -> its O_DIRECT descriptor, None where refused (opened beside the buffered one)
        self._direct_fds: dict[str, int | None] = {}
        self._refused: list[int] = []  # O_DIRECT descriptors of files that refused a read
        self._bounces = BounceBuffers(self.direct_block)  # one per read thread
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
                    self._direct_fds[file] = open_direct(path)
            return fd

    def _direct_fd(self, file: str) -> int | None:
        """The O_DIRECT descriptor of an open ``file`` (None: buffered reads only)."""
        with self._lock:
            return self._direct_fds.get(file)

    def _refuse_direct(self, file: str, fd: int) -> None:
        """``file`` turned out to refuse O_DIRECT reads: read it buffered from now on. The
        descriptor stays open until :meth:`close` (another read thread may be using it: a
        number closed under it could be reused by the next file opened)."""
        with self._lock:
            if self._direct_fds.get(file) == fd:
                self._direct_fds[file] = None
                self._refused.append(fd)
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
                    bounce = self._bounces.get()
                    return size, read_direct(direct, offset, run, bounce, file=file)
                except DirectRefused:
                    self._refuse_direct(file, direct)
        self._read_buffered(fd, offset, run, file)
        return 0, 0

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
        error: BaseException | None = None
        direct = bounced = 0
        try:
            runs = self._runs(requests)
            if self._pool is None:  # one after another, on this thread
                try:
                    for fd, offset, run, file in runs:
                        d, b = self._read_run(fd, offset, run, file)
                        direct, bounced = direct + d, bounced + b
                except BaseException as exc:
                    error = exc
            else:
                futures = [self._pool.submit(self._read_run, *run) for run in runs]
                for fut in futures:
                    try:
                        d, b = fut.result()
                        direct, bounced = direct + d, bounced + b
                    except BaseException as exc:  # wait on, so no thread writes after we return
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
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for direct in (*self._direct_fds.values(), *self._refused):
                if direct is not None:
                    os.close(direct)
            self._direct_fds.clear()
            self._refused.clear()
        self._bounces.close()

    @property
    def bounce_bytes(self) -> int:
        """Memory of the bounce buffers made (part of this rank's staging)."""
        return self._bounces.nbytes

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
