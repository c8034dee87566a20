"""Open a checkpoint source and agree on its plan: the index and plan phases of a load.

A source is a local folder or file, or a Hugging Face Hub repository. Both the API and the CLI
open sources here (:func:`open_index`). During a load (:func:`agree_on_plan`, collective) the
coordinator's messages go in one order on every rank:

1. rank 0 describes the source (:class:`SourceDescriptor`: local, or a Hub repository pinned
   to one commit) and every rank receives the description;
2. Hub sources only: every rank takes part in finding which ranks share a cache folder;
3. rank 0 reads the index and headers, runs the placement and the planner, and every rank
   receives the finished plan (JSON, no pickle); rank 0 keeps its own object.

A failure on rank 0 in either step is raised on every rank (``distload.coordination``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distload.checkpoint import read_checkpoint
from distload.coordination import COORDINATOR, agree, from_coordinator
from distload.errors import DistLoadError
from distload.hub import download as hub_download
from distload.hub.download import DownloadStats
from distload.hub.options import HubOptions, find_domains, make_hub_plan, pin_hub_source
from distload.hub.remote import Resolved, read_hub_index
from distload.index import CheckpointIndex
from distload.manifest import load_digests
from distload.options import CoordinatorKnobs, LoadOptions, coordinator_knobs
from distload.placement.base import Placement
from distload.plan import LoadPlan
from distload.planner import make_plan
from distload.residency import choose_cached, in_page_cache
from distload.transforms import apply_transforms
from distload.transport.base import Transport


@dataclass(frozen=True)
class SourceDescriptor:
    """What rank 0 found the source to be; travels to every rank."""

    hub: Resolved | None  # a Hub repository pinned to one commit, or None for a local path
    token: str  # unique per load: names probe files and shared-memory files

    def to_json(self) -> bytes:
        hub = self.hub.to_json() if self.hub is not None else None
        return json.dumps({"hub": hub, "token": self.token}).encode()

    @staticmethod
    def from_json(data: bytes) -> SourceDescriptor:
        raw = json.loads(data)
        hub = Resolved.from_json(raw["hub"]) if raw["hub"] is not None else None
        return SourceDescriptor(hub, raw["token"])


def describe_source(source: str | os.PathLike[str], options: LoadOptions) -> SourceDescriptor:
    """Coordinator: a local source, or the Hub repository ``source`` names pinned to a commit."""
    resolved = pin_hub_source(source, options.hub)
    if resolved is not None and (options.verify or options.allow_pickle):
        raise DistLoadError(
            "verify= and allow_pickle= apply to local sources; Hub files are checked "
            "against the Hub's sha256 when fetched, and only safetensors are fetched",
            phase="index",
        )
    return SourceDescriptor(resolved, uuid.uuid4().hex)


def read_index(
    source: str | os.PathLike[str],
    hub: Resolved | None,
    hub_options: HubOptions,
    *,
    max_header_bytes: int,
    allow_pickle: bool = False,
) -> CheckpointIndex:
    """Coordinator: the validated index of a local source, or of a pinned Hub source (its
    index and headers by range requests, before any shard is downloaded)."""
    if hub is None:
        local = Path(source) / hub_options.subfolder if hub_options.subfolder else source
        return read_checkpoint(
            local,
            max_header_bytes=max_header_bytes,
            allow_pickle=allow_pickle,
            variant=hub_options.variant,
        )
    return read_hub_index(
        hub_options.client(), hub, max_header_bytes=max_header_bytes, variant=hub_options.variant
    )


def open_index(
    source: str | os.PathLike[str],
    hub_options: HubOptions,
    *,
    max_header_bytes: int,
    allow_pickle: bool = False,
) -> tuple[CheckpointIndex, Resolved | None]:
    """One process (the CLI): the index of ``source`` and, for a Hub source, its pin."""
    hub = pin_hub_source(source, hub_options)
    index = read_index(
        source, hub, hub_options, max_header_bytes=max_header_bytes, allow_pickle=allow_pickle
    )
    return index, hub


def _phase(phase: str, exc: Exception) -> Exception:
    if getattr(exc, "phase", None) is None:
        exc.phase = phase  # type: ignore[attr-defined]
    return exc


class Coordinator:
    """Rank 0's side of :func:`agree_on_plan`: it describes the source, then plans. Its state
    (the description, the plan it made) stays on this object between the two messages."""

    def __init__(
        self,
        source: str | os.PathLike[str],
        placement: Placement | None,
        options: LoadOptions,
        *,
        world_size: int,
        nodes: Sequence[int],
        names: Collection[str] | None,
        resident: Sequence[Collection[str] | None] = (),
    ) -> None:
        self.source, self.placement, self.options = source, placement, options
        self.world_size, self.nodes, self.names = world_size, nodes, names
        # over several nodes: the files each node's first rank found in its page cache
        self.resident = resident
        self.described: SourceDescriptor | None = None
        self.plan: LoadPlan | None = None

    def describe(self) -> bytes:
        try:
            self.described = describe_source(self.source, self.options)
        except Exception as exc:
            raise _phase("index", exc) from None
        return self.described.to_json()

    def read_index(self) -> CheckpointIndex:
        assert self.described is not None
        return read_index(
            self.source,
            self.described.hub,
            self.options.hub,
            max_header_bytes=self.options.max_header_bytes,
            allow_pickle=self.options.allow_pickle,
        )

    def first_message(self) -> bytes:
        """Rank 0's first message (:func:`frame`): the source, and for a local one (no cache
        domains to find first) the plan too."""
        described = self.describe()
        assert self.described is not None
        return frame(described, self.make(None) if self.described.hub is None else None)

    def make(self, domains: list[tuple[int, ...]] | None) -> bytes:
        """The finished plan, kept here and encoded for the other ranks."""
        assert self.described is not None
        opts = self.options
        try:
            index = self.read_index()
            digests = load_digests(index, opts.verify) if opts.verify else None
        except Exception as exc:
            raise _phase("index", exc) from None
        try:
            self.plan = self._plan(index, digests, domains)
        except Exception as exc:
            raise _phase("plan", exc) from None
        return self.plan.to_json() if self.world_size > 1 else b""

    def _plan(self, index: CheckpointIndex, digests: Any, domains: Any) -> LoadPlan:
        assert self.described is not None
        opts, hub, allowed = self.options, None, None
        if self.described.hub is not None:
            readers = opts.readers or range(self.world_size)
            hub, allowed = make_hub_plan(index, self.described.hub, domains, readers, opts.hub)
        knobs = coordinator_knobs()
        plan = make_plan(
            index,
            self.world_size,
            self.placement,
            dtype=opts.dtype,
            bucket_bytes=opts.bucket,
            readers=opts.readers,
            names=self._names(index),
            transforms=opts.transforms,
            nodes=self.nodes,
            digests=digests,
            file_readers=allowed,
            hub=hub,
            token=self.described.token,
            check_every=knobs.check_every,
            multicast=knobs.multicast,
        )
        if hub is None and knobs.page_cache != "0" and self.world_size > 1:
            plan = dataclasses.replace(plan, cached_files=tuple(self._cached(plan, knobs)))
        return plan

    def _cached(self, plan: LoadPlan, knobs: CoordinatorKnobs) -> list[str]:
        """The planned files every node holds in its page cache (``distload.residency``):
        on one node rank 0 probes them; over several, each node's first rank reported."""
        used = sorted({plan.tensors[i.tensor].file for b in plan.buckets for i in b.items})
        if knobs.page_cache == "force":
            return used
        if len(set(self.nodes)) <= 1:
            return [f for f in used if in_page_cache(Path(plan.index.root) / f)]
        return choose_cached(used, self.resident)

    def _names(self, index: CheckpointIndex) -> Collection[str] | None:
        """The outputs to load: ``keys`` present in the checkpoint, or every ``out=`` name
        (each must be in the checkpoint)."""
        keys, names = self.options.keys, self.names
        if keys is None and names is None:
            return None
        produced = {v.name for v in apply_transforms(index, self.options.transforms)}
        if keys is not None:
            return sorted(set(keys) & produced)
        assert names is not None
        missing = sorted(set(names) - produced)
        if missing:
            raise DistLoadError(
                f"out= names {len(missing)} tensor(s) not in the checkpoint: {missing[:5]}",
                tensor=missing[0],
                phase="plan",
            )
        return names


def agree_on_plan(net: Transport, coordinator: Coordinator, nodes: Sequence[int]) -> LoadPlan:
    """Collective: every rank returns the same plan. Every rank passes its own
    :class:`Coordinator` (its Hub cache folder takes part in finding cache domains); its
    ``describe`` and ``make`` run on rank 0 only.

    A local source takes one message from rank 0 (the source and the plan together); a Hub
    source two, since every rank takes part in finding the cache domains between them."""
    first = coordinator.first_message if net.rank == COORDINATOR else _nothing
    described_json, payload = unframe(from_coordinator(net, "plan", first))
    described = SourceDescriptor.from_json(described_json)
    if payload is None:  # a Hub source: the plan depends on the cache domains
        domains = find_domains(net, coordinator.options.hub, described.token, nodes)
        second = (lambda: coordinator.make(domains)) if net.rank == COORDINATOR else _nothing
        payload = from_coordinator(net, "plan", second)
    error: BaseException | None = None
    plan = coordinator.plan  # rank 0 keeps its own object: no JSON round trip for itself
    if plan is None:
        try:
            plan = LoadPlan.from_json(payload)
        except Exception as exc:
            error = exc
    if net.world_size > 1:
        agree(net, "plan", error)
    assert plan is not None
    return plan


def frame(described: bytes, plan: bytes | None) -> bytes:
    """Rank 0's first message: the source descriptor and, for a local source, the plan."""
    if plan is None:
        return b"D" + described
    return b"P" + len(described).to_bytes(8, "little") + described + plan


def unframe(message: bytes) -> tuple[bytes, bytes | None]:
    """The (descriptor, plan or None) of a :func:`frame` message."""
    if message[:1] == b"D":
        return message[1:], None
    if message[:1] == b"P" and len(message) >= 9:
        n = int.from_bytes(message[1:9], "little")
        return message[9 : 9 + n], message[9 + n :]
    raise DistLoadError("plan: malformed message from rank 0", phase="plan")


def _nothing() -> bytes:  # pragma: no cover - only the coordinator's function runs
    raise RuntimeError("only rank 0 runs coordinator steps")


@dataclass(frozen=True)
class Fetched:
    """Where this rank reads the checkpoint's files from, after the download phase."""

    root: Path  # folder of the files (a Hub source: its cache snapshot)
    contain: Path | None  # reads must stay inside this folder (Hub cache blobs)
    files: dict[str, Path]  # Hub sources: local paths of the extra files fetched
    stats: DownloadStats


def fetch(net: Transport, plan: LoadPlan, options: LoadOptions) -> Fetched:
    """Collective for Hub sources (the download phase); a local source needs nothing."""
    hub = plan.hub
    if hub is None:
        return Fetched(Path(plan.index.root), None, {}, DownloadStats())
    reads = {
        hub.resolved.path(plan.tensors[item.tensor].file)
        for b in plan.buckets
        if b.reader == net.rank
        for item in b.items
    }
    stats = hub_download.run_downloads(
        net,
        hub,
        reads,
        cache_dir=options.hub.cache,
        token=options.hub.token,
        progress=options.download_progress if net.rank == 0 else None,
    )
    root, contain = hub_download.local_root(hub, options.hub.cache)
    return Fetched(root, contain, hub_download.extra_paths(hub, options.hub.cache), stats)
