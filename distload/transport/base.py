"""The transport protocol: moving byte buffers between the ranks of the load's group.

All ranks call the collective methods (``broadcast``, ``all_reduce_max``, ``all_gather_bytes``,
``broadcast_bytes``) in the same order; ``send``/``recv`` are point to point. Buffers are flat
``uint8`` tensors on :attr:`Transport.device`. Every blocking call waits at most the
transport's timeout and raises :class:`~distload.errors.PeerError` naming ``what`` it was
waiting for, so a dead or stalled peer never hangs a rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class Transport(Protocol):
    rank: int  # this process's rank in the load's group
    world_size: int  # size of the load's group
    device: torch.device  # where communication buffers must live
    # operations this rank has waited on so far: one per collective or transfer issued (a
    # bytes exchange that takes a second round counts two); the load report's figure
    operations: int

    def broadcast(self, buf: torch.Tensor, src: int, what: str) -> None: ...

    def send(self, buf: torch.Tensor, dst: int, what: str) -> None: ...

    def recv(self, buf: torch.Tensor, src: int, what: str) -> None: ...

    def all_reduce_max(self, value: int, what: str) -> int: ...

    def all_gather_bytes(self, data: bytes, what: str) -> list[bytes]: ...

    def broadcast_bytes(self, data: bytes | None, src: int, what: str) -> bytes: ...

    def open_groups(self, groups: Sequence[tuple[int, ...]], what: str) -> bool:
        """Create one sub-group per rank set of ``groups`` (all ranks call this with the same
        list, in the same order). Returns False where the transport cannot, and then callers
        send to each member point to point instead."""
        ...

    def group_broadcast(
        self, buf: torch.Tensor, members: tuple[int, ...], src: int, what: str
    ) -> None:
        """Broadcast ``buf`` from ``src`` to the ranks ``members`` (a group opened by
        :meth:`open_groups`); only members call it."""
        ...

    def close_groups(self) -> None:
        """Release the groups of :meth:`open_groups` (every rank, after the load)."""
        ...
