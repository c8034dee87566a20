"""The Hub cache on each rank's machine: integrity of cached files, refs, cache sharing.

* :func:`verify_cached` checks a cached file against the size and hash the Hub lists for it
  (sha256 for large files, the git blob id for small ones). A whole-file hash runs once per
  blob; a stamp (size, mtime, inode) under ``<cache>/.locks/distload/verified/`` remembers
  it, so a later load re-hashes only a blob that changed on disk. (``.locks`` is the cache's
  scratch folder, the one place ``huggingface_hub``'s cache scan does not read as a repo.)
* :func:`cache_domains` (collective) finds which ranks share one cache folder -- all of them
  on a shared filesystem, one node's ranks with node-local disks -- by having every rank drop
  a probe file and every rank list what it sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
from pathlib import Path

from distload.coordination import agree, gather_or_fail
from distload.hub.remote import Resolved, repo_dir, snapshot_dir
from distload.transport.base import Transport

log = logging.getLogger(__name__)

_BLOCK = 8 * 1024 * 1024


def state_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """distload's own files in a Hub cache (verification stamps, cache-sharing probes)."""
    return Path(cache_dir) / ".locks" / "distload"


def file_digest(path: str | os.PathLike[str], *, git: bool = False) -> str:
    """sha256 of a file's bytes, or (``git=True``) its git blob id."""
    h = hashlib.sha1() if git else hashlib.sha256()
    with open(path, "rb") as fh:
        if git:
            h.update(b"blob %d\0" % os.fstat(fh.fileno()).st_size)
        while chunk := fh.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def _stamp_path(cache_dir: str, repo_id: str, digest: str) -> Path:
    return state_dir(cache_dir) / "verified" / repo_dir("", repo_id).name / digest


def verify_cached(cache_dir: str, resolved: Resolved, name: str) -> str | None:
    """Why the cached copy of repo file ``name`` cannot be used, or None when it is whole and
    matches the Hub's hash. Hashes the blob unless an up-to-date stamp says it was checked."""
    path = snapshot_dir(cache_dir, resolved.ref.repo_id, resolved.commit) / name
    expected = resolved.files[name]
    try:
        blob = os.path.realpath(path)
        st = os.stat(blob)
    except OSError:
        return "not in the cache"
    if st.st_size != expected.size:
        return f"cached copy has {st.st_size} bytes, the Hub lists {expected.size}"
    digest = expected.sha256 or expected.git_oid
    if digest is None:
        return None
    stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    marker = _stamp_path(cache_dir, resolved.ref.repo_id, digest)
    try:
        if marker.read_text() == stamp:
            return None
    except OSError:
        pass
    got = file_digest(blob, git=expected.sha256 is None)
    if got != digest:
        kind = "sha256" if expected.sha256 else "git blob id"
        return f"{kind} of the cached bytes is {got}, the Hub lists {digest}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(stamp)
        os.replace(tmp, marker)
    except OSError as exc:  # a read-only cache: verify again next time
        log.debug("cannot record verification of %s: %s", name, exc)
    return None


def discard(cache_dir: str, resolved: Resolved, name: str) -> None:
    """Remove a bad cached file: its snapshot link and the blob it points to."""
    path = snapshot_dir(cache_dir, resolved.ref.repo_id, resolved.commit) / name
    blob = os.path.realpath(path)
    for victim in (path, Path(blob)):
        try:
            victim.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove bad cache entry %s: %s", victim, exc)


def write_ref(cache_dir: str, resolved: Resolved) -> None:
    """Record ``revision -> commit`` in ``refs/`` (what offline loads of a branch read)."""
    if resolved.ref.revision == resolved.commit or resolved.offline:
        return
    ref = repo_dir(cache_dir, resolved.ref.repo_id) / "refs" / resolved.ref.revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if ref.is_file() and ref.read_text() == resolved.commit:
            return
        tmp = ref.with_name(f"{ref.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(resolved.commit)
        os.replace(tmp, ref)
    except OSError as exc:
        log.debug("cannot write ref %s: %s", ref, exc)


def group_domains(seen: list[set[int]]) -> list[tuple[int, ...]]:
    """Group ranks whose probes saw the same set of ranks; a rank that could not even see its
    own probe (read-only cache) is a domain of its own."""
    by_view: dict[frozenset[int], list[int]] = {}
    alone: list[tuple[int, ...]] = []
    for rank, view in enumerate(seen):
        if rank not in view:
            alone.append((rank,))
        else:
            by_view.setdefault(frozenset(view), []).append(rank)
    domains = [tuple(ranks) for ranks in by_view.values()] + alone
    return sorted(domains)


def cache_domains(net: Transport, cache_dir: str, token: str) -> list[tuple[int, ...]]:
    """Collective: the groups of ranks that share one cache folder (sorted, by lowest rank)."""
    probe_dir = state_dir(cache_dir) / "probe"
    mine = probe_dir / f"{token}-{net.rank}"
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
        mine.write_text(str(os.getpid()))
    except OSError as exc:
        log.info("cannot write a probe in the Hub cache %s (%s): not sharing it", cache_dir, exc)
    agree(net, "index", None)  # every probe is written before anyone looks

    def look() -> bytes:
        seen = []
        try:
            for entry in os.listdir(probe_dir):
                head, _, rank = entry.rpartition("-")
                if head == token and rank.isdigit():
                    seen.append(int(rank))
        except OSError:
            pass
        return ",".join(map(str, sorted(seen))).encode()

    gathered = gather_or_fail(net, "index", look)
    with contextlib.suppress(OSError):
        mine.unlink()
    seen = [{int(r) for r in g.decode().split(",") if r} for g in gathered]
    return group_domains(seen)
