"""Hub options of a load and the coordinator steps that use them.

``distload.load`` runs, for a Hub source: :func:`pin_hub_source` (rank 0: is it a Hub repo,
and at which commit), :func:`find_domains` (collective: which ranks share a cache), then
:func:`make_hub_plan` (rank 0: who downloads and who may read each shard), then the download
phase (``distload.hub.download``).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from distload.errors import CheckpointError, DistLoadError
from distload.hub.cache import cache_domains
from distload.hub.plan import HubPlan, assign_files
from distload.hub.ref import parse_hub_source
from distload.hub.remote import HubClient, Resolved, default_cache_dir, hub_offline
from distload.index import CheckpointIndex
from distload.transport.base import Transport

CACHE_MODES = ("auto", "shared", "node")
_REFUSED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".onnx", ".gguf")


@dataclass(frozen=True)
class HubOptions:
    """How a Hub source is fetched (every rank passes the same, except ``cache_dir``)."""

    revision: str | None = None  # branch, tag or commit (default "main")
    subfolder: str | None = None  # folder of the repository holding the weights
    cache_dir: str | os.PathLike[str] | None = None  # default: HF_HUB_CACHE
    token: str | bool | None = None  # default: the huggingface_hub token (HF_TOKEN, login)
    local_files_only: bool = False  # like HF_HUB_OFFLINE=1 for this load
    hub_cache: str = "auto"  # "auto" (probe), "shared" (one cache), "node" (one per node)
    extra_files: Sequence[str] = ()  # also fetch these (names or patterns): "config.json"
    endpoint: str | None = None  # default: HF_ENDPOINT
    variant: str | None = None  # weights variant, local sources too: model.fp16.safetensors

    def __post_init__(self) -> None:
        if self.hub_cache not in CACHE_MODES:
            raise DistLoadError(f"hub_cache must be one of {CACHE_MODES}, got {self.hub_cache!r}")

    @property
    def cache(self) -> str:
        return str(self.cache_dir) if self.cache_dir is not None else default_cache_dir()

    @property
    def offline(self) -> bool:
        return self.local_files_only or hub_offline()

    def client(self) -> HubClient:
        return HubClient(
            cache_dir=self.cache, token=self.token, endpoint=self.endpoint, offline=self.offline
        )


def pin_hub_source(source: str | os.PathLike[str], options: HubOptions) -> Resolved | None:
    """Coordinator: the pinned Hub source ``source`` names, or None for a local path."""
    ref = parse_hub_source(source, options.revision, options.subfolder)
    if ref is None:
        if options.revision is not None:
            raise CheckpointError(
                f"{os.fspath(source)!r} is a local path; revision= applies to Hub sources only",
                file=os.fspath(source),
            )
        return None  # a local path (subfolder=: a folder inside it)
    return options.client().resolve(ref)


def find_domains(
    net: Transport, options: HubOptions, token: str, nodes: Sequence[int]
) -> list[tuple[int, ...]]:
    """Collective: groups of ranks sharing one Hub cache, per ``options.hub_cache``."""
    if options.hub_cache == "shared" or net.world_size == 1:
        return [tuple(range(net.world_size))]
    if options.hub_cache == "node":
        by_node: dict[int, list[int]] = {}
        for rank in range(net.world_size):
            by_node.setdefault(nodes[rank] if nodes else 0, []).append(rank)
        return sorted(tuple(r) for r in by_node.values())
    return cache_domains(net, options.cache, token)


def _extra(resolved: Resolved, patterns: Sequence[str]) -> list[str]:
    sub = resolved.ref.subfolder
    prefix = f"{sub}/" if sub else ""
    names = [n.removeprefix(prefix) for n in resolved.files if n.startswith(prefix)]
    chosen: list[str] = []
    for pattern in patterns:
        hits = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
        if not hits:
            raise CheckpointError(
                f"{resolved.ref.url(resolved.commit)} has no file matching {pattern!r}",
                file=pattern,
            )
        for name in hits:
            if name.endswith(_REFUSED):
                raise CheckpointError(
                    f"extra file {name!r} is a weights or pickle format distload does not "
                    "download; safetensors weights are fetched by the load itself",
                    file=name,
                )
            if name not in chosen:
                chosen.append(name)
    return [resolved.path(n) for n in chosen]


def make_hub_plan(
    index: CheckpointIndex,
    resolved: Resolved,
    domains: Sequence[tuple[int, ...]],
    readers: Collection[int],
    options: HubOptions,
) -> tuple[HubPlan, dict[str, tuple[int, ...]]]:
    """Coordinator: the Hub plan and the readers allowed for each shard (for the planner)."""
    sizes = {f.name: f.size for f in index.files}
    downloader, allowed = assign_files(sizes, domains, readers)
    downloads = [(resolved.path(name), rank) for name, rank in sorted(downloader.items())]
    extra = _extra(resolved, options.extra_files)
    downloads += [(name, domain[0]) for name in extra for domain in domains]
    hub = HubPlan(resolved, tuple(domains), tuple(downloads), allowed, tuple(extra))
    return hub, allowed
