"""Storage: positioned reads of checkpoint bytes into caller buffers, and reusable staging arenas.

Used by reader ranks. Reads use ``os.preadv`` into preallocated memory (no whole-file loads and
no reliance on mmap page faults, which are slow on network filesystems), split into blocks
issued from a small thread pool so several requests are in flight at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distload.errors import CheckpointError
from distload.index import FileMeta
from distload.locate import safe_member

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
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        threads: int = DEFAULT_READ_THREADS,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        contain: str | os.PathLike[str] | None = None,
        expect: Mapping[str, FileMeta] | None = None,
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
        self.bytes_read = 0
        # bytes read through the page cache: the kernel copies each of them once (a read
        # that bypasses the cache, O_DIRECT, is a DMA and counts 0)
        self.bytes_kernel_copied = 0

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is not None:
                self._fds.move_to_end(file)
            else:
                self._close_idle(self.max_open - 1)
                path = safe_member(self.root, file, where=str(self.root), contain=self.contain)
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    self._check_identity(fd, file)
                except BaseException:
                    os.close(fd)
                    raise
                if ADVISE_AHEAD and hasattr(os, "posix_fadvise"):
                    # reads are large and their next ranges are announced (advise): no
                    # kernel read-ahead past them into bytes other readers fetch
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fds[file] = fd
            return fd

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

    def _read_run(self, fd: int, offset: int, run: list[tuple[memoryview, str]], file: str) -> None:
        """Fill the buffers of ``run`` from consecutive bytes of ``file`` starting at ``offset``
        (one ``preadv`` per pass, resumed after short reads)."""
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
            total = len(req.target)
            for start in range(0, total, self.block_bytes):
                view = req.target[start : min(total, start + self.block_bytes)]
                where = req.offset + start
                last = runs[-1] if runs else None
                if (
                    last is not None
                    and last[0] == fd
                    and where == end
                    and size + len(view) <= self.block_bytes
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
            os.posix_fadvise(self._fd(file), offset, length, os.POSIX_FADV_WILLNEED)

    def read(self, requests: Sequence[ReadRequest]) -> None:
        """Fill every request's target; blocks until all are read (parallel runs). Requests
        spanning more files than may stay open are read in groups of files, in order."""
        wanted = [r for r in requests if len(r.target)]
        group: list[ReadRequest] = []
        files: set[str] = set()
        for req in wanted:
            if req.file not in files and len(files) >= self.max_open:
                self._read_group(group, files)
                group, files = [], set()
            group.append(req)
            files.add(req.file)
        if group:
            self._read_group(group, files)
        nbytes = sum(len(r.target) for r in wanted)
        self.bytes_read += nbytes
        self.bytes_kernel_copied += nbytes

    def _read_group(self, requests: list[ReadRequest], files: set[str]) -> None:
        with self._lock:
            self._busy = files
        try:
            futures = [
                self._pool.submit(self._read_run, fd, offset, run, file)
                for fd, offset, run, file in self._runs(requests)
            ]
            error: BaseException | None = None
            for fut in futures:
                try:
                    fut.result()
                except BaseException as exc:  # keep waiting so no thread writes after we return
                    error = error or exc
        finally:
            with self._lock:
                self._busy = set()
        if error is not None:
            if isinstance(error, OSError):
                raise CheckpointError(f"read failed: {error}") from error
            raise error

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Arenas:
    """Named, reusable staging buffers that grow to the largest size asked of them.

    Each name (e.g. ``"read0"``, ``"recv"``) is one buffer reused for every bucket, so a rank's
    staging memory is the sum of its arenas' sizes, bounded by the plan's bucket size.
    Host arenas are pinned when ``pin`` is set (for fast copies to CUDA).
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
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device, pin_memory=self.pin)
            self._buffers[name] = buf
        return buf[:nbytes]

    @property
    def nbytes(self) -> int:
        """Bytes held by all arenas now (their peak, since they never shrink)."""
        return sum(b.numel() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()
