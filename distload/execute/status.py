"""The failure state and the figures of one rank during the execute phase.

A rank that fails between two status checks must not leave its peers waiting: it keeps to the
schedule (its sends go out unfilled, its receives are dropped) and shares the failure at the
next agreement, where every rank raises the same error. :class:`Status` holds that pending
failure and where the current bucket stands, so the loop knows whether peers are already
inside the bucket's transfer (then the failure is raised at once, naming this rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from distload.plan import Bucket


@dataclass
class ExecStats:
    """What this rank did while executing (part of the load report)."""

    bytes_read: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_copied: int = 0  # by this rank's CPU: into host destinations, packing
    bytes_kernel_copied: int = 0  # by the kernel: reads through the page cache
    bytes_direct: int = 0  # read with O_DIRECT (a DMA; the copy out counts in bytes_copied)
    read_seconds: float = 0.0
    transfer_seconds: float = 0.0
    buckets: int = 0


def describe(number: int, bucket: Bucket) -> str:
    """How a bucket's transfer is named in errors."""
    return f"transfer: bucket {number} ({bucket.kind}, reader rank {bucket.reader})"


@dataclass
class Status:
    """This rank's pending failure and the progress of the current bucket (main thread)."""

    pending: BaseException | None = None  # a local failure not yet shared with the peers
    agreed: bool = False  # the current bucket's status check has passed
    moving: bool = False  # the current bucket's sends / receives have started
    # some shared bucket ran without a collective of its own already (shared memory, page cache)
    collective_free: bool = False

    @property
    def failed(self) -> bool:
        return self.pending is not None

    def begin_bucket(self) -> None:
        self.agreed = self.moving = False

    def keep(self, exc: BaseException, phase: str) -> None:
        """Keep ``exc`` (tagged with ``phase`` unless it has one) for the next agreement; the
        first failure wins."""
        if getattr(exc, "phase", None) is None:
            with contextlib.suppress(AttributeError):
                exc.phase = phase  # type: ignore[attr-defined]
        if self.pending is None:
            self.pending = exc

    def guard(self, fn: Callable[[], object]) -> None:
        """Run a local copy; a failure is kept for the next agreement. Once this rank has
        failed its copies are moot (the load ends at the next check) and are skipped."""
        if self.pending is not None:
            return
        try:
            fn()
        except Exception as exc:  # shared with all ranks at the next agreement (its phase)
            self.pending = exc
