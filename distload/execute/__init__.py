"""The execute phase: read, transfer and copy every bucket of a plan on every rank.

* :mod:`~distload.execute.run` -- :class:`ExecutePhase`, the owner of the phase's resources;
* :mod:`~distload.execute.executor` -- the loop over the plan's buckets;
* :mod:`~distload.execute.reader` -- the read-ahead thread and its read results;
* :mod:`~distload.execute.exchange` -- broadcast, point to point, shared memory;
* :mod:`~distload.execute.copies` -- copies into the destinations;
* :mod:`~distload.execute.status` -- the failure state and figures of a rank.
"""

from distload.execute.executor import Executor
from distload.execute.reader import PREFETCH_DEPTH, Read, ReadAhead, ReadFailure
from distload.execute.run import STAGING_ARENAS, ExecResult, ExecutePhase
from distload.execute.status import ExecStats

__all__ = [
    "PREFETCH_DEPTH",
    "STAGING_ARENAS",
    "ExecResult",
    "ExecStats",
    "ExecutePhase",
    "Executor",
    "Read",
    "ReadAhead",
    "ReadFailure",
]
