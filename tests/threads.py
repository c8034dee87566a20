"""A process group of threads: an in-memory transport for testing collective code paths
(coordination, the plan protocol, the executor) at world sizes > 1 without processes."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

TIMEOUT = 20.0


class ThreadGroup:
    """Shared state of one group of ``world`` thread-ranks."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=TIMEOUT)
        self.slots: list[Any] = [None] * world
        self.mail = {(s, d): queue.Queue() for s in range(world) for d in range(world)}


class ThreadTransport:
    """One rank's view of a :class:`ThreadGroup` (the ``Transport`` protocol)."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world
        self.device = torch.device("cpu")
        self.operations = 0

    def _exchange(self, value: Any) -> list[Any]:
        self.operations += 1
        self.group.slots[self.rank] = value
        self.group.barrier.wait()
        got = list(self.group.slots)
        self.group.barrier.wait()
        return got

    def broadcast(self, buf: torch.Tensor, src: int, what: str) -> None:
        got = self._exchange(buf.clone() if self.rank == src else None)
        if self.rank != src:
            buf.copy_(got[src])

    def send(self, buf: torch.Tensor, dst: int, what: str) -> None:
        self.operations += 1
        self.group.mail[(self.rank, dst)].put(buf.clone())

    def recv(self, buf: torch.Tensor, src: int, what: str) -> None:
        self.operations += 1
        buf.copy_(self.group.mail[(src, self.rank)].get(timeout=TIMEOUT))

    def all_reduce_max(self, value: int, what: str) -> int:
        return max(self._exchange(value))

    def all_gather_bytes(self, data: bytes, what: str) -> list[bytes]:
        return list(self._exchange(data))

    def broadcast_bytes(self, data: bytes | None, src: int, what: str) -> bytes:
        got = self._exchange(data)[src]
        assert got is not None
        return got  # type: ignore[no-any-return]

    def open_groups(self, groups: Sequence[tuple[int, ...]], what: str) -> bool:
        return False

    def group_broadcast(
        self, buf: torch.Tensor, members: tuple[int, ...], src: int, what: str
    ) -> None:
        raise RuntimeError("no sub-groups")

    def close_groups(self) -> None:
        return None


def run_threads(world: int, fn: Callable[[ThreadTransport], Any]) -> list[Any]:
    """Run ``fn`` on ``world`` thread-ranks; each rank's result, or the exception it raised."""
    group = ThreadGroup(world)
    results: list[Any] = [None] * world

    def one(rank: int) -> None:
        try:
            results[rank] = fn(ThreadTransport(group, rank))
        except BaseException as exc:
            results[rank] = exc

    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert not any(t.is_alive() for t in threads), "a thread-rank hung"
    return results
