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

A probe answers from the kernel without waiting for the disk (``preadv2(RWF_NOWAIT)`` on
pages spread over the file), so it costs about 0.5 ms per file and never reads storage. A
file counts as cached when most of it is (:data:`ENOUGH`).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path

SAMPLES = 128  # pages probed per file, spread over it
ENOUGH = 0.9  # resident fraction from which a file counts as cached


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
    it cannot be told: of ``SAMPLES`` pages spread over the file, those that read without
    waiting (``preadv2(RWF_NOWAIT)``). Never reads storage; about 0.5 ms per file (an exact
    ``mincore`` over a mapping costs 10 ms per 400 MB shard, too much on rank 0 per load)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0.0
        return _sampled_fraction(fd, size)
    finally:
        os.close(fd)


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
