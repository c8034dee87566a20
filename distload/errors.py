"""Errors raised by distload.

Every failure of a load, on any rank and in any phase, ends as a :class:`DistLoadError` raised on
*every* rank of the group. The error carries one :class:`Failure` record per failing rank, so the
message names the rank(s), the phase, and where known the file and tensor involved.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

PHASES = (
    "runtime",
    "index",
    "plan",
    "download",  # Hub sources only
    "materialize",
    "read",
    "transfer",
    "close",
)


@dataclass(frozen=True)
class Failure:
    """What went wrong on one rank (plain data, so it can travel between ranks as JSON)."""

    rank: int  # rank (within the load's group) where the failure happened
    phase: str  # one of PHASES
    kind: str  # exception class name, e.g. "CheckpointError"
    message: str  # the exception's message
    file: str | None = None  # checkpoint file involved, if any
    tensor: str | None = None  # tensor name involved, if any

    def describe(self) -> str:
        where = "".join(
            f" [{k}: {v}]" for k, v in (("file", self.file), ("tensor", self.tensor)) if v
        )
        return f"rank {self.rank}, phase '{self.phase}': {self.kind}: {self.message}{where}"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def from_json(data: bytes) -> Failure:
        return Failure(**json.loads(data.decode()))


class DistLoadError(RuntimeError):
    """A load failed. Raised identically on every rank of the group.

    Attributes:
        failures: one record per failing rank (empty for errors raised before any rank was
            involved, e.g. argument validation in a single process).
        phase: phase of the first failure, if known.
        file / tensor: file and tensor of the first failure, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        tensor: str | None = None,
        phase: str | None = None,
        failures: tuple[Failure, ...] = (),
    ) -> None:
        super().__init__(message)
        self.file = file
        self.tensor = tensor
        self.phase = phase
        self.failures = failures

    @property
    def ranks(self) -> tuple[int, ...]:
        """Ranks on which the load failed."""
        return tuple(sorted({f.rank for f in self.failures}))


class CheckpointError(DistLoadError, ValueError):
    """The checkpoint is missing, malformed, inconsistent or unsafe."""


class PlacementError(DistLoadError, ValueError):
    """A placement rule cannot be applied to a tensor (bad dim, bad group size, ...)."""


class PeerError(DistLoadError):
    """Another rank died, stalled past the timeout, or broke the collective protocol."""


_KINDS: dict[str, type[DistLoadError]] = {
    cls.__name__: cls for cls in (DistLoadError, CheckpointError, PlacementError, PeerError)
}


def failure_from_exception(exc: BaseException, rank: int, phase: str) -> Failure:
    """Turn a local exception into a :class:`Failure` record."""
    return Failure(
        rank=rank,
        phase=getattr(exc, "phase", None) or phase,
        kind=type(exc).__name__,
        message=str(exc) if not isinstance(exc, DistLoadError) else exc.args[0],
        file=getattr(exc, "file", None),
        tensor=getattr(exc, "tensor", None),
    )


def error_from_failures(failures: list[Failure], world_size: int) -> DistLoadError:
    """Build the one error every rank raises from the failures gathered from all ranks.

    The error class is the distload class of the first failure when it is one (so callers may
    catch :class:`CheckpointError`), otherwise :class:`DistLoadError`.
    """
    failures = sorted(failures, key=lambda f: f.rank)
    first = failures[0]
    cls = _KINDS.get(first.kind, DistLoadError)
    ranks = ", ".join(str(f.rank) for f in failures)
    head = f"distload: load failed in phase '{first.phase}' on rank(s) {ranks} of {world_size}"
    body = "\n".join("  " + f.describe() for f in failures)
    return cls(
        f"{head}\n{body}",
        file=first.file,
        tensor=first.tensor,
        phase=first.phase,
        failures=tuple(failures),
    )
