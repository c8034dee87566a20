"""Every rank loads what rank 0 plans, so every rank must have asked for the same thing.

Runs on every rank right after the runtime phase (collective, one small ``all_gather``):
each rank sends a fingerprint of every argument that changes the result or the collectives
(source, placement, dtype, transforms, keys, readers, transport, shm, verify, Hub revision);
a rank whose arguments differ from rank 0's makes every rank raise the same
:class:`~distload.errors.DistLoadError` naming the argument and the ranks, instead of being
silently given rank 0's choice.

``out=`` may name different tensors on different ranks (a pipeline stage or a device map
gives each rank its own tensors): the load then loads the union of all ranks' names, and each
rank must pass exactly the tensors it holds of it. A rank passing ``out=`` while another
passes none is an error (``None`` means "allocate every tensor").

The same all_gather carries each rank's node (so the job's topology costs no collective of
its own). Over several nodes a second one then carries each rank's ``report`` of its machine
(the first rank of each node lists the checkpoint files its page cache holds:
``distload.residency``); on one node rank 0 finds that out itself when planning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distload.coordination import gather_or_fail
from distload.errors import DistLoadError, Failure
from distload.transport.base import Transport

PREVIEW = 160  # characters of an argument shown when ranks disagree on it


def canonical(obj: Any) -> Any:
    """A JSON form of an argument that is equal in two processes exactly when the arguments
    are equal (order kept where it matters, e.g. rules: the first match wins)."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, re.Pattern):
        return ["re", obj.pattern, obj.flags]
    if isinstance(obj, Mapping):
        return [[canonical(k), canonical(v)] for k, v in obj.items()]
    if isinstance(obj, list | tuple):
        return [canonical(x) for x in obj]
    if isinstance(obj, set | frozenset):
        return sorted((canonical(x) for x in obj), key=repr)
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return [kind, canonical(fields)]
    if callable(obj) and not hasattr(obj, "__dict__"):
        return [kind, getattr(obj, "__qualname__", repr(obj))]
    state = getattr(obj, "__dict__", None)
    if state is not None:
        public = {k: v for k, v in state.items() if not k.startswith("_")}
        return [kind, canonical(public)]
    return [kind, repr(obj)]


def _entry(value: Any) -> list[str]:
    text = json.dumps(canonical(value), sort_keys=False, default=repr)
    return [hashlib.sha256(text.encode()).hexdigest()[:32], text[:PREVIEW]]


def _names_digest(names: Collection[str] | None) -> str | None:
    if names is None:
        return None
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Agreed:
    """What :func:`agree_on_arguments` found, the same on every rank."""

    names: list[str] | None  # the ``out=`` names to plan for (the union over ranks), or None
    reports: tuple[Any, ...]  # every rank's ``report`` (JSON values), in rank order
    nodes: tuple[int, ...] = (0,)  # node index of every rank (numbered by first rank)


def node_order(identities: Sequence[str]) -> tuple[int, ...]:
    """Node index of every rank from each rank's node identity, nodes numbered in order of
    their first rank."""
    order: dict[str, int] = {}
    return tuple(order.setdefault(n, len(order)) for n in identities)


def agree_on_arguments(
    net: Transport,
    arguments: Mapping[str, Any],
    out_names: Collection[str] | None,
    *,
    node: str = "",
    report: Callable[[tuple[int, ...]], Any] | None = None,
) -> Agreed:
    """Collective: raise on every rank if any rank's ``arguments`` differ from rank 0's.
    ``node`` (this rank's node identity: ``distload.runtime.node_identity``) travels in the
    same all_gather and gives :attr:`Agreed.nodes`. ``report(nodes)`` (a JSON value: what
    this rank found about its machine, e.g. the files its page cache holds; None where it
    has nothing to tell) is gathered in a second all_gather, only over several nodes (one
    node has nothing to tell its coordinator that rank 0 cannot find out itself)."""
    mine = {
        "args": {k: _entry(v) for k, v in arguments.items()},
        "out": _names_digest(out_names),
        "node": node,
    }
    names = sorted(out_names) if out_names is not None else None
    if net.world_size == 1:
        return Agreed(names, (report((0,)) if report is not None else None,))
    gathered = [
        json.loads(b) for b in gather_or_fail(net, "plan", lambda: json.dumps(mine).encode())
    ]
    for key in arguments:
        _check_same(key, [g["args"][key] for g in gathered])
    nodes = node_order([g["node"] for g in gathered])
    reports: tuple[Any, ...] = (None,) * net.world_size
    if report is not None and len(set(nodes)) > 1:
        probe = report
        reports = tuple(
            json.loads(b)
            for b in gather_or_fail(net, "plan", lambda: json.dumps(probe(nodes)).encode())
        )
    digests = [g["out"] for g in gathered]
    if len(set(digests)) == 1:
        return Agreed(names, reports, nodes)
    without = [r for r, d in enumerate(digests) if d is None]
    if without:
        given = [r for r, d in enumerate(digests) if d is not None]
        raise DistLoadError(
            f"ranks {given} pass out= but ranks {without} do not (None allocates every "
            "tensor): pass out= on every rank or on none",
            phase="plan",
        )
    lists = gather_or_fail(net, "plan", lambda: json.dumps(sorted(out_names or ())).encode())
    return Agreed(sorted({name for data in lists for name in json.loads(data)}), reports, nodes)


def _check_same(key: str, entries: list[list[str]]) -> None:
    """All ranks' fingerprints of argument ``key`` equal rank 0's, or a DistLoadError."""
    first = entries[0][0]
    differ = [r for r, (digest, _) in enumerate(entries) if digest != first]
    if not differ:
        return
    example = differ[0]
    message = (
        f"ranks disagree on the argument {key!r}: rank 0 passed {entries[0][1]}, but "
        f"rank(s) {differ} passed something else (rank {example}: {entries[example][1]}); "
        "every rank of a load must pass the same value"
    )
    raise DistLoadError(
        message,
        phase="plan",
        failures=tuple(Failure(r, "plan", "DistLoadError", message) for r in differ),
    )
