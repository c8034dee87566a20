"""Exception-robust coordination: a failure on any rank is raised on every rank.

Two helpers wrap every non-data step of a load:

* :func:`from_coordinator` runs a function on rank 0 only and shares its result (bytes) -- or
  its failure -- with all ranks;
* :func:`agree` ends a phase in which every rank did local work: one ``all_reduce(MAX)`` of a
  failure flag, and only if some rank failed, an ``all_gather`` of the failure records, after
  which every rank raises the same :class:`~distload.errors.DistLoadError`.

Both are collectives: every rank of the group must call them in the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from distload.errors import (
    DistLoadError,
    Failure,
    error_from_failures,
    failure_from_exception,
)
from distload.transport.base import Transport

log = logging.getLogger(__name__)

COORDINATOR = 0


def agree(transport: Transport, phase: str, error: BaseException | None) -> None:
    """Collective: raise the same DistLoadError on every rank if ``error`` is set on any."""
    failed = transport.all_reduce_max(1 if error is not None else 0, f"{phase}: status check")
    if not failed:
        return
    mine = b""
    if error is not None:
        mine = failure_from_exception(error, transport.rank, phase).to_json()
    gathered = transport.all_gather_bytes(mine, f"{phase}: gathering failures")
    failures = [Failure.from_json(data) for data in gathered if data]
    raise error_from_failures(failures, transport.world_size) from error


def gather_or_fail(transport: Transport, phase: str, fn: Callable[[], bytes]) -> list[bytes]:
    """Collective: every rank runs ``fn`` and all results are gathered -- or, if ``fn`` failed
    on any rank, every rank raises the same DistLoadError (one collective either way)."""
    try:
        mine = b"\x00" + fn()
    except Exception as exc:  # any failure must reach the other ranks
        log.debug("step %s failed", phase, exc_info=True)
        mine = b"\x01" + failure_from_exception(exc, transport.rank, phase).to_json()
    gathered = transport.all_gather_bytes(mine, f"{phase}: exchanging with all ranks")
    failures = [Failure.from_json(g[1:]) for g in gathered if g[:1] == b"\x01"]
    if failures:
        raise error_from_failures(failures, transport.world_size)
    return [g[1:] for g in gathered]


def from_coordinator(transport: Transport, phase: str, fn: Callable[[], bytes]) -> bytes:
    """Collective: run ``fn`` on the coordinator and return its bytes on every rank.

    If ``fn`` raises, every rank raises the same DistLoadError naming the coordinator.
    """
    payload: bytes | None = None
    if transport.rank == COORDINATOR:
        try:
            payload = b"\x00" + fn()
        except Exception as exc:  # any failure must reach the other ranks
            log.debug("coordinator step %s failed", phase, exc_info=True)
            payload = b"\x01" + failure_from_exception(exc, COORDINATOR, phase).to_json()
    data = transport.broadcast_bytes(payload, COORDINATOR, f"{phase}: waiting for rank 0")
    if data[:1] == b"\x01":
        raise error_from_failures([Failure.from_json(data[1:])], transport.world_size)
    if data[:1] != b"\x00":
        raise DistLoadError(f"{phase}: malformed message from rank 0", phase=phase)
    return data[1:]
