"""Single-process transport: a group of one, no process group needed."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LocalTransport:
    """The trivial transport for world size 1 (every collective is the identity)."""

    rank = 0
    world_size = 1
    operations = 0  # a group of one waits on no one

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")

    def broadcast(self, buf: torch.Tensor, src: int, what: str) -> None:
        return None

    def send(self, buf: torch.Tensor, dst: int, what: str) -> None:
        raise RuntimeError(f"{what}: no peer to send to in a single-process load")

    def recv(self, buf: torch.Tensor, src: int, what: str) -> None:
        raise RuntimeError(f"{what}: no peer to receive from in a single-process load")

    def all_reduce_max(self, value: int, what: str) -> int:
        return value

    def all_gather_bytes(self, data: bytes, what: str) -> list[bytes]:
        return [data]

    def broadcast_bytes(self, data: bytes | None, src: int, what: str) -> bytes:
        assert data is not None
        return data

    def open_groups(self, groups: Sequence[tuple[int, ...]], what: str) -> bool:
        return False  # a group of one has no sub-groups

    def group_broadcast(
        self, buf: torch.Tensor, members: tuple[int, ...], src: int, what: str
    ) -> None:
        raise RuntimeError(f"{what}: no sub-groups in a single-process load")

    def close_groups(self) -> None:
        return None
