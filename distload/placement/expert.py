"""Expert parallelism: which ranks hold each routed expert of a mixture-of-experts checkpoint.

Routed experts are recognised by name: a component ``experts`` followed by the expert's index,
as Hugging Face MoE checkpoints write them (``model.layers.3.mlp.experts.17.down_proj.weight``,
Mixtral's ``model.layers.0.block_sparse_moe.experts.5.w1.weight``). The name up to the index
(``model.layers.3.mlp.experts``) is the expert *set*; its experts are numbered ``0..E-1``.
Shared experts (``shared_experts.gate_proj``) and the router carry no index: they are not
routed experts and follow the dense rules.

Inside a group of ``S`` ranks (a pipeline stage of a :class:`~distload.Mesh`, or the whole
group), ranks are arranged as Megatron-Core arranges its expert grid: local index ``l`` (rank
order) is expert-TP rank ``l % etp`` of expert-parallel group ``(l // etp) % ep``, and the
``S / (ep * etp)`` ranks with the same coordinates are expert-data-parallel replicas. Expert
``e`` of a set of ``E`` lives in group ``e // (E / ep)`` (contiguous blocks, as Megatron-Core,
vLLM and DeepSpeed place them): its tensors are cut over the group's ``etp`` ranks by the
TP rules and held whole when ``etp`` is 1.

Pure functions of names and sizes, evaluated by the coordinator (rank 0) like every placement.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from distload.errors import PlacementError
from distload.index import TensorMeta

#: A routed expert's name: ``<set>.experts.<index>.<rest>`` (``<set>`` may be empty).
EXPERT_PATTERN = r"(?:^|\.)experts\.(\d+)\."


def find_experts(
    tensors: Sequence[TensorMeta], pattern: str = EXPERT_PATTERN
) -> list[tuple[str, int] | None]:
    """(expert set, expert index) of every tensor, None for tensors of no routed expert.

    ``pattern`` is a regular expression searched in the name whose first group is the
    index; the set is the name up to that group."""
    regex = re.compile(pattern)
    if regex.groups < 1:
        raise PlacementError(f"expert pattern {pattern!r} needs a group capturing the index")
    found: list[tuple[str, int] | None] = []
    for meta in tensors:
        match = regex.search(meta.name)
        if match is None:
            found.append(None)
            continue
        found.append((meta.name[: match.start(1)].rstrip("."), int(match.group(1))))
    return found


def count_experts(
    tensors: Sequence[TensorMeta],
    found: Sequence[tuple[str, int] | None],
    ep: int,
    num_experts: int | None = None,
) -> dict[str, int]:
    """Experts per set: ``num_experts`` when given, else the highest index seen plus one.

    Raises :class:`~distload.errors.PlacementError` naming the set and a tensor when a set
    cannot be cut into ``ep`` equal groups, or an index reaches ``num_experts``."""
    seen: dict[str, tuple[int, str]] = {}  # set -> (highest index, a tensor with it)
    for meta, where in zip(tensors, found, strict=True):
        if where is not None and where[1] >= seen.get(where[0], (-1, ""))[0]:
            seen[where[0]] = (where[1], meta.name)
    counts: dict[str, int] = {}
    for name, (top, tensor) in seen.items():
        if num_experts is not None and top >= num_experts:
            raise PlacementError(
                f"tensor {tensor!r} is expert {top} of {name!r}, but num_experts={num_experts}",
                tensor=tensor,
            )
        count = num_experts if num_experts is not None else top + 1
        if count % ep:
            raise PlacementError(
                f"{name!r} has {count} experts, which do not split evenly into ep={ep} groups "
                f"({count} % {ep} = {count % ep}; e.g. tensor {tensor!r})",
                tensor=tensor,
            )
        counts[name] = count
    return counts


def group_of(expert: int, count: int, ep: int) -> int:
    """Expert-parallel group holding ``expert`` of a set of ``count`` (contiguous blocks)."""
    return expert // (count // ep)


def group_members(ranks: Sequence[int], ep: int, etp: int) -> list[tuple[int, ...]]:
    """The ranks of each expert-parallel group, given the group's ranks in order.

    Each group lists its ranks in order, so the one at position ``p`` is expert-TP rank
    ``p % etp`` (what :class:`~distload.placement.base.Layout` expects of its holders)."""
    size = len(ranks)
    if size % (ep * etp):
        raise PlacementError(
            f"ep({ep}) * expert_tp({etp}) = {ep * etp} does not divide the {size} ranks it "
            "spreads experts over"
        )
    groups: list[list[int]] = [[] for _ in range(ep)]
    for local, rank in enumerate(ranks):
        groups[(local // etp) % ep].append(rank)
    return [tuple(g) for g in groups]
