"""Who downloads which Hub file, and who may then read it (pure; runs on the coordinator).

The ranks fall into *cache domains* (ranks sharing one cache folder: the whole job on a
shared filesystem, one node with node-local disks; see ``distload.hub.cache``). Each shard is
given to exactly one domain (largest shards first, to the domain with the fewest bytes so
far) and, inside it, to one downloader rank (again the least loaded). Only ranks of that
domain may read the shard, so every byte crosses the network from the Hub once per job; the
planner then moves slices to other domains over the process group like any other bytes.
Small extra files (``config.json`` ...) go to the first rank of every domain.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distload.errors import PlacementError
from distload.hub.remote import Resolved


@dataclass(frozen=True)
class HubPlan:
    """The Hub part of a load plan (identical on every rank)."""

    resolved: Resolved
    domains: tuple[tuple[int, ...], ...]  # ranks sharing one cache folder
    downloads: tuple[tuple[str, int], ...]  # (repo path, rank) for each file to fetch
    readers: dict[str, tuple[int, ...]] = field(default_factory=dict)  # shard -> allowed readers
    extra: tuple[str, ...] = ()  # extra repo paths asked for (config.json ...)

    @property
    def mode(self) -> str:
        """``shared`` (one cache for the job) or ``per-domain`` (several caches)."""
        return "shared" if len(self.domains) == 1 else f"{len(self.domains)} caches"

    def domain_of(self, rank: int) -> tuple[int, ...]:
        for domain in self.domains:
            if rank in domain:
                return domain
        return (rank,)

    def to_json(self) -> dict[str, Any]:
        return {
            "resolved": self.resolved.to_json(),
            "domains": [list(d) for d in self.domains],
            "downloads": [list(d) for d in self.downloads],
            "readers": {k: list(v) for k, v in self.readers.items()},
            "extra": list(self.extra),
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> HubPlan:
        return HubPlan(
            Resolved.from_json(data["resolved"]),
            tuple(tuple(d) for d in data["domains"]),
            tuple((n, int(r)) for n, r in data["downloads"]),
            {k: tuple(v) for k, v in data["readers"].items()},
            tuple(data["extra"]),
        )


def assign_files(
    sizes: Mapping[str, int],
    domains: Sequence[Sequence[int]],
    readers: Collection[int],
) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    """(downloader rank, allowed reader ranks) per file, balanced by bytes.

    ``sizes`` maps file -> bytes; ``readers`` are the ranks allowed to read storage.
    """
    eligible = [tuple(r for r in d if r in readers) for d in domains]
    eligible = [d for d in eligible if d]
    if not eligible:
        raise PlacementError(f"no reader rank {sorted(readers)} is in any cache domain")
    domain_load = [0] * len(eligible)
    rank_load: dict[int, int] = {r: 0 for d in eligible for r in d}
    downloader: dict[str, int] = {}
    allowed: dict[str, tuple[int, ...]] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        d = min(range(len(eligible)), key=lambda i: (domain_load[i], eligible[i][0]))
        rank = min(eligible[d], key=lambda r: (rank_load[r], r))
        domain_load[d] += sizes[name]
        rank_load[rank] += sizes[name]
        downloader[name] = rank
        allowed[name] = eligible[d]
    return downloader, allowed
