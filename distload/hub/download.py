"""The download phase of a Hub load (collective; runs on every rank).

Each rank fetches the files the :class:`~distload.hub.plan.HubPlan` gives it -- through
``huggingface_hub.hf_hub_download``, so the cache layout, token, endpoint, locks and in-flight
resume are the client's own -- pinned to the resolved commit. Every fetched (or already
cached) file is checked against the Hub's size and hash before anyone reads it; a bad cache
entry is removed and fetched again once, and a second mismatch fails the load. While the
downloads run in worker threads, the main thread exchanges progress with all ranks every
``poll`` seconds: rank 0 gets one aggregated figure for its progress bar, a failure on any
rank stops the downloads everywhere, and a dead or stalled peer is noticed within the
transport's timeout instead of after the longest download.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distload.coordination import agree
from distload.errors import (
    CheckpointError,
    DistLoadError,
    Failure,
    error_from_failures,
    failure_from_exception,
)
from distload.hub.cache import discard, verify_cached, write_ref
from distload.hub.plan import HubPlan
from distload.hub.remote import missing_offline, snapshot_dir
from distload.transport.base import Transport

log = logging.getLogger(__name__)

DOWNLOAD_THREADS = 4
POLL_SECONDS = 0.5


class _Cancelled(Exception):
    """Raised inside a download when another rank failed: stops it at the next chunk."""


@dataclass
class DownloadStats:
    """What this rank fetched from the Hub."""

    bytes_downloaded: int = 0  # bytes received from the Hub (cache hits count 0)
    files_downloaded: int = 0
    files_cached: int = 0  # files found whole and verified in the cache
    seconds: float = 0.0


class _Progress:
    """Byte counts of this rank's downloads (thread-safe), and the cancel switch."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.network = 0  # bytes received
        self.settled = 0  # bytes of files finished (downloaded or found in the cache)
        self.cancel = threading.Event()
        self.callback_error: BaseException | None = None  # the caller's progress raised

    def counter_class(self) -> type:
        """A tqdm stand-in for ``hf_hub_download(tqdm_class=...)`` feeding this object."""
        progress = self

        class Counter:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.n = int(kwargs.get("initial") or 0)

            def update(self, n: int | float = 1) -> None:
                if progress.cancel.is_set():
                    raise _Cancelled("another rank failed")
                with progress.lock:
                    progress.network += int(n)
                self.n += int(n)

            def __enter__(self) -> Counter:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def close(self) -> None:
                return None

            def set_description(self, *args: Any, **kwargs: Any) -> None:
                return None

        return Counter


def _hf_download(
    hub: HubPlan,
    name: str,
    cache_dir: str,
    *,
    token: str | bool | None,
    endpoint: str | None,
    counter: type,
) -> None:
    from huggingface_hub import hf_hub_download

    kwargs: dict[str, Any] = {
        "revision": hub.resolved.commit,
        "cache_dir": cache_dir,
        "token": token,
        "endpoint": endpoint,
    }
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = counter
    hf_hub_download(hub.resolved.ref.repo_id, name, **kwargs)


def fetch_verified(
    hub: HubPlan,
    name: str,
    *,
    cache_dir: str,
    token: str | bool | None = None,
    endpoint: str | None = None,
    progress: _Progress | None = None,
) -> bool:
    """Make repo file ``name`` whole and verified in ``cache_dir``; True if it was fetched."""
    resolved = hub.resolved
    where = resolved.ref.url(resolved.commit)
    progress = progress or _Progress()
    problem = verify_cached(cache_dir, resolved, name)
    if problem is None:
        return False
    if resolved.offline:
        if problem == "not in the cache":
            raise missing_offline(resolved, name, cache_dir)
        raise CheckpointError(
            f"{where}: cached {name!r} is damaged ({problem}) and offline mode "
            "(HF_HUB_OFFLINE) forbids fetching it again",
            file=name,
        )
    for attempt in (1, 2):
        if problem != "not in the cache":
            log.warning("%s: cached %r rejected (%s); fetching it again", where, name, problem)
            discard(cache_dir, resolved, name)
        try:
            _hf_download(
                hub,
                name,
                cache_dir,
                token=token,
                endpoint=endpoint,
                counter=progress.counter_class(),
            )
        except _Cancelled:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"{where}: downloading {name!r} (revision {resolved.ref.revision!r}) failed: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                file=name,
            ) from None
        problem = verify_cached(cache_dir, resolved, name)
        if problem is None:
            write_ref(cache_dir, resolved)
            return True
        log.warning("%s: download %d of %r rejected: %s", where, attempt, name, problem)
    discard(cache_dir, resolved, name)
    raise CheckpointError(
        f"{where}: {name!r} (revision {resolved.ref.revision!r}) was downloaded twice and "
        f"rejected both times ({problem}); it was removed from the cache and not loaded",
        file=name,
    )


def run_downloads(
    net: Transport,
    hub: HubPlan,
    reads: Collection[str],
    *,
    cache_dir: str,
    token: str | bool | None = None,
    endpoint: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    poll: float = POLL_SECONDS,
) -> DownloadStats:
    """Collective: fetch this rank's files, then check that every file this rank reads
    (``reads``: repo paths) is in its cache. Raises the same DistLoadError on every rank if
    any rank failed."""
    start = time.perf_counter()
    sizes = {f.name: f.size for f in hub.resolved.files.values()}
    mine = [name for name, rank in hub.downloads if rank == net.rank]
    total = sum(sizes.get(name, 0) for name, _ in hub.downloads)
    state = _Progress()
    stats = DownloadStats()

    def one(name: str) -> None:
        fetched = fetch_verified(
            hub, name, cache_dir=cache_dir, token=token, endpoint=endpoint, progress=state
        )
        with state.lock:
            state.settled += sizes.get(name, 0)
            if fetched:
                stats.files_downloaded += 1
            else:
                stats.files_cached += 1

    pool = ThreadPoolExecutor(max(1, min(DOWNLOAD_THREADS, len(mine))), "distload-hub")
    futures: list[Future[None]] = [pool.submit(one, name) for name in mine]
    try:
        while not _exchange_progress(net, futures, state, total, progress):
            if futures:
                wait(futures, timeout=poll, return_when=FIRST_EXCEPTION)
            else:
                time.sleep(poll)
    finally:
        state.cancel.set()
        pool.shutdown(wait=False, cancel_futures=True)
    stats.bytes_downloaded = state.network
    error: BaseException | None = None
    try:
        _check_cached(hub, reads, sizes, cache_dir)
    except DistLoadError as exc:
        error = exc
    agree(net, "download", error)
    stats.seconds = time.perf_counter() - start
    return stats


def _exchange_progress(
    net: Transport,
    futures: list[Future[None]],
    state: _Progress,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> bool:
    """Collective: every rank's progress (or failure) to every rank; True once all are done.
    A failure on any rank stops the downloads everywhere and is raised on every rank."""
    finished = all(f.done() for f in futures)
    raised = next(
        (f.exception() for f in futures if f.done() and f.exception() is not None),
        None,
    )
    with state.lock:
        figures = {"done": finished, "settled": state.settled, "network": state.network}
    if state.callback_error is not None:  # this rank's progress callback raised
        raised = state.callback_error
    if raised is not None and not isinstance(raised, _Cancelled):
        mine = b"\x01" + failure_from_exception(raised, net.rank, "download").to_json()
    else:
        mine = b"\x00" + json.dumps(figures).encode()
    gathered = net.all_gather_bytes(mine, "download: exchanging progress")
    failures = [Failure.from_json(g[1:]) for g in gathered if g[:1] == b"\x01"]
    if failures:
        state.cancel.set()
        raise error_from_failures(failures, net.world_size)
    views = [json.loads(g[1:]) for g in gathered]
    if progress is not None and net.rank == 0:
        try:
            progress(sum(v["settled"] for v in views), total)
        except Exception as exc:  # shared with every rank at the next exchange
            state.callback_error = exc
            return False
    return all(v["done"] for v in views)


def _check_cached(
    hub: HubPlan, reads: Collection[str], sizes: dict[str, int], cache_dir: str
) -> None:
    """Every file this rank reads is whole in its cache after the download phase."""
    root = snapshot_dir(cache_dir, hub.resolved.ref.repo_id, hub.resolved.commit)
    for name in sorted(reads):
        path = root / name
        if not path.is_file() or path.stat().st_size != sizes[name]:
            raise CheckpointError(
                f"{hub.resolved.ref.url(hub.resolved.commit)}: {name!r} is not in this "
                f"rank's Hub cache {cache_dir} after the download phase (a cache not shared "
                "with the rank that fetched it? pass hub_cache='node' when each node has its "
                "own cache folder, or hub_cache='auto' to find out with a probe file)",
                file=name,
            )


def local_root(hub: HubPlan, cache_dir: str) -> tuple[Path, Path]:
    """(folder the plan's file names are relative to, folder links may point into) for this
    rank: the commit's snapshot in its cache (plus subfolder), and the repository folder."""
    snap = snapshot_dir(cache_dir, hub.resolved.ref.repo_id, hub.resolved.commit)
    sub = hub.resolved.ref.subfolder
    return (snap / sub if sub else snap), snap.parent.parent


def extra_paths(hub: HubPlan, cache_dir: str) -> dict[str, Path]:
    """Local paths of the extra files asked for (relative to the weights' subfolder)."""
    snap = snapshot_dir(cache_dir, hub.resolved.ref.repo_id, hub.resolved.commit)
    out = {}
    for name in hub.extra:
        path = snap / name
        if os.path.exists(path):
            sub = hub.resolved.ref.subfolder
            out[name.removeprefix(f"{sub}/") if sub else name] = path
    return out
