"""Which checkpoint files are in the page cache, on each node, and so read from it.

A shared bucket whose files every node holds in its page cache needs no reader and no
transfer: each rank reads its own parts from the cache (``distload.execute.pagecache``).
Deciding that takes facts from every node:

* on one node, rank 0 probes the files it plans (:func:`in_page_cache`) -- its page cache is
  every rank's;
* across nodes, the first rank of each node probes the source's files
  (:func:`resident_files`, before the plan, so the answer rides on the arguments' all_gather:
  no collective of its own) and rank 0 keeps the files every node holds
  (:func:`choose_cached`).

Readers also ask, per block they read, whether the block is cached (:func:`cached_range`,
``cachestat``): a cached block is read through the page cache, an uncached one with
``O_DIRECT`` (``distload.storage``).

A probe answers from the kernel without waiting for the disk (``cachestat``, over windows
spread over a large file; ``preadv2(RWF_NOWAIT)`` on pages spread over it where the kernel
lacks ``cachestat``), so it costs under a millisecond per file, whatever its size, and never
reads storage. A file counts as cached when most of it is (:data:`ENOUGH`).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

SAMPLES = 128  # pages probed per file, spread over it
ENOUGH = 0.9  # resident fraction from which a file counts as cached
# a file larger than this is probed in WINDOWS windows of WINDOW bytes spread over it, not
# whole: cachestat walks every cached page of its range, and a file written but not yet read
# back (a fresh download) sits in 4 KiB pages, 30 ms per 4 GB on rank 0's critical path
SAMPLED_FROM = 256 * 1024 * 1024
WINDOWS = 64
WINDOW = 1024 * 1024


def in_page_cache(path: str | os.PathLike[str], *, enough: float = ENOUGH) -> bool:
    """Whether ``path`` is (mostly) resident in the page cache: at least ``enough`` of its
    pages. A warm file often has some pages reclaimed (0.5-5% of each 400 MB shard a few
    minutes after reading it, seen on a machine with 20 GB free); the page-cache path
    faults those in as it copies, which costs far less than taking the whole file down the
    cold path. False where the platform or the filesystem cannot tell (then the load reads
    as if cold). Runs on any rank."""
    fraction = resident_fraction(path)
    return fraction is not None and fraction >= enough


def resident_fraction(path: str | os.PathLike[str]) -> float | None:
    """The fraction of ``path``'s pages in the page cache (0.0 for an empty file), None where
    it cannot be told: from ``cachestat`` (Linux 6.5; it starts no read), exact up to
    :data:`SAMPLED_FROM` bytes and, for larger files, over :data:`WINDOWS` windows spread over
    the file (a cost per file, not per byte: 64 calls of a few microseconds, where a whole
    4 GB file written and not yet read back took 30 ms); elsewhere, of ``SAMPLES`` pages
    spread over the file, those that read without waiting (``preadv2(RWF_NOWAIT)``: about 0.5
    ms per file, and each miss starts the kernel's read-ahead of its page -- a whole small
    file comes into the cache, some 1 MB of a 400 MB one). An exact ``mincore`` over a
    mapping costs 10 ms per 400 MB shard, too much on rank 0 per load."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0.0
        fraction = _cachestat_fraction(fd, size)
        return fraction if fraction is not None else _sampled_fraction(fd, size)
    finally:
        os.close(fd)


def _cachestat_fraction(fd: int, size: int) -> float | None:
    """The cached fraction of an open file of ``size`` > 0 bytes by ``cachestat``: of all its
    pages, or beyond :data:`SAMPLED_FROM` of :data:`WINDOWS` windows spread over it; None
    where the kernel cannot tell."""
    if size <= SAMPLED_FROM:
        pages = cached_pages(fd, 0, size)
        return None if pages is None else min(1.0, pages / _page_span(0, size)[1])
    step = (size - WINDOW) // (WINDOWS - 1) // _PAGE * _PAGE
    held = asked = 0
    for i in range(WINDOWS):
        pages = cached_pages(fd, i * step, WINDOW)
        if pages is None:
            return None
        held += pages
        asked += _page_span(i * step, WINDOW)[1]
    return min(1.0, held / asked)


def _sampled_fraction(fd: int, size: int) -> float | None:
    """Fraction of ``SAMPLES`` pages spread over an open file that read without waiting."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or not hasattr(os, "preadv"):
        return None
    page = bytearray(4096)
    step = max(4096, size // SAMPLES)
    offsets = range(0, size, step)
    hits = 0
    for offset in offsets:
        try:
            hits += os.preadv(fd, [page], offset, flag) > 0
        except BlockingIOError:  # not cached
            pass
        except OSError:  # EOPNOTSUPP: cannot tell
            return None
    return hits / len(offsets)


def evict(path: str | os.PathLike[str], offset: int = 0, length: int = 0) -> None:
    """Drop ``[offset, offset + length)`` of file ``path`` (``length`` 0: to its end) from the
    page cache, written back first so the drop takes (cold reads next; benchmarks and tests).
    Pages a process has mapped stay. No-op where the platform has no ``posix_fadvise``."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_files(source: str | os.PathLike[str]) -> list[str] | None:
    """The ``.safetensors`` files of a local ``source`` (a folder, or a file in one) that this
    machine holds in its page cache, named relative to that folder; None when ``source`` is
    not a local path (a Hub repository id). Runs on the first rank of each node."""
    path = Path(source)
    try:
        root = path if path.is_dir() else path.parent if path.is_file() else None
        if root is None:
            return None
        names = sorted(e.name for e in os.scandir(root) if e.name.endswith(".safetensors"))
    except OSError:
        return None
    return [name for name in names if in_page_cache(root / name)]


def node_report(
    source: str | os.PathLike[str], rank: int, nodes: Sequence[int]
) -> list[str] | None:
    """What this rank tells the others about its page cache: on the first rank of each node
    of a job over several nodes, :func:`resident_files` of ``source`` (unless
    ``DISTLOAD_PAGE_CACHE=0``); None elsewhere (one node: rank 0 probes the planned files
    itself)."""
    if len(set(nodes)) < 2 or node_leaders(nodes).get(nodes[rank]) != rank:
        return None
    if os.environ.get("DISTLOAD_PAGE_CACHE", "auto") == "0":
        return None
    return resident_files(source)


def node_leaders(nodes: Sequence[int]) -> dict[int, int]:
    """Node index -> its first rank (the one that probes for the node)."""
    leaders: dict[int, int] = {}
    for rank, node in enumerate(nodes):
        leaders.setdefault(node, rank)
    return leaders


def choose_cached(
    used: Collection[str],
    reports: Sequence[Collection[str] | None],
) -> list[str]:
    """Rank 0: the files of ``used`` that every node reported resident (``reports``: one per
    node, None for a node that could not tell -- then no file counts as cached)."""
    if not reports or any(r is None for r in reports):
        return []
    held = [set(r) for r in reports if r is not None]
    return sorted(f for f in used if all(f in h for h in held))


# cachestat(2) (Linux 6.5): how many pages of a range the page cache holds, without touching
# them and without starting any read; the same number on every architecture. It counts pages
# of the kernel's size (16 or 64 KiB on some arm64 kernels, not always 4 KiB).
_CACHESTAT = 451
_PAGE = mmap.PAGESIZE


def _page_span(offset: int, length: int) -> tuple[int, int]:
    """(first page, number of pages) of ``[offset, offset + length)``, ``length`` > 0."""
    first = offset // _PAGE
    return first, (offset + length - 1) // _PAGE - first + 1


class _Range(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _Stat(ctypes.Structure):
    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    )


def _libc_syscall() -> Any:
    """libc's ``syscall`` (None off Linux)."""
    if os.uname().sysname != "Linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):  # pragma: no cover - no C library to call
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall = _libc_syscall()
_cachestat_works = _syscall is not None


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many pages of ``[offset, offset + length)`` of open file ``fd`` the page cache
    holds (``cachestat``: exact, about 7 us per 2 MiB asked from Python, no read started);
    None where the kernel cannot tell (before Linux 6.5, other systems). Any thread."""
    global _cachestat_works
    if not _cachestat_works:
        return None
    if length <= 0:
        return 0
    first, pages = _page_span(offset, length)
    rng, stat = _Range(first * _PAGE, pages * _PAGE), _Stat()
    assert _syscall is not None
    if _syscall(_CACHESTAT, ctypes.c_uint(fd), ctypes.byref(rng), ctypes.byref(stat), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter
            _cachestat_works = False
        return None
    return int(stat.nr_cache)


def cached_range(fd: int, offset: int, length: int) -> bool | None:
    """Whether every page of ``[offset, offset + length)`` of open file ``fd`` is in the page
    cache (:func:`cached_pages`); None where the kernel cannot tell. Any thread."""
    held = cached_pages(fd, offset, length)
    if held is None:
        return None
    return length <= 0 or held >= _page_span(offset, length)[1]
