"""Hugging Face / accelerate style ``device_map`` placements over the ranks of a job.

Planned on rank 0 like every placement. Given a model (``load_into`` / ``from_pretrained``
call :meth:`DeviceMap.for_model` on every rank), the units are the model's modules
(:mod:`distload.placement.model_tree`); otherwise they are recovered from tensor names
(:mod:`distload.placement.modules`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from distload.errors import PlacementError
from distload.index import TensorMeta
from distload.placement.base import Layout
from distload.placement.model_tree import ModuleTree, default_no_split, module_tree
from distload.placement.modules import covers, group_blocks, longest_prefix, split_contiguous

Target = int | str  # a rank, or "cpu"
_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DISK = (
    "distload places weights on ranks and in host memory ('cpu') and runs no offload hooks, so "
    "nothing can stay on disk: use 'cpu', more ranks, or a larger max_memory"
)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | str, what: str) -> int:
    """Bytes of ``value``: an int, or a size string as accelerate takes them (``"10GiB"``,
    ``"500MB"``, ``"1.5 GB"``; ``GB`` is 10**9 bytes, ``GiB`` 2**30)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if found and found.group(2).lower() in _UNITS:
            return int(float(found.group(1)) * _UNITS[found.group(2).lower()])
    raise PlacementError(
        f"{what} = {value!r}: expected bytes (an int >= 0) or a size like '10GiB' or '500MB'"
    )


def parse_max_memory(max_memory: Mapping[Any, int | str] | None) -> dict[Target, int]:
    """``{rank or "cpu": bytes}`` from accelerate-style keys (ints, ``"0"``, ``"cpu"``)."""
    out: dict[Target, int] = {}
    for given, value in (max_memory or {}).items():
        if given == "disk":
            raise PlacementError(f"max_memory['disk']: {_DISK}")
        key = int(given) if isinstance(given, str) and given.isdigit() else given
        if key != "cpu" and (not isinstance(key, int) or isinstance(key, bool) or key < 0):
            raise PlacementError(f"max_memory key {key!r}: expected a rank (0, 1, ...) or 'cpu'")
        out[key] = parse_size(value, f"max_memory[{key!r}]")
    return out


class DeviceMap:
    """Place whole modules on ranks, like ``from_pretrained(device_map=...)``.

    Args:
        device_map: ``{"model.layers.1": 0, "lm_head": "cpu", ...}``: keys are module prefixes
            (a prefix covers all tensors under it; the longest prefix wins; ``""`` covers
            everything); values are ranks or ``"cpu"``. Every tensor must be covered. Or a
            strategy: ``"auto"``/``"balanced"`` (contiguous modules balanced by bytes over the
            ranks), ``"balanced_low_0"`` (the same over ranks 1.., rank 0 left free) and
            ``"sequential"`` (fill rank 0 up to its ``max_memory``, then rank 1, ...).
        max_memory: ``{rank or "cpu": bytes or "10GiB"}`` limits for the strategies. Modules
            keep the model's order: once one did not fit it goes to the next rank, and past
            the last rank to ``"cpu"``, and every later module after it (fails when ``"cpu"``
            has no room either).
        no_split: module prefixes, or (given a model) class names, that must stay whole.
            With a model the default is its ``_no_split_modules``; numbered layers and the
            module beside the layer stack that holds other tensors (``bert.embeddings``) are
            never split anyway.
        cpu_rank: rank whose host memory holds ``"cpu"`` entries.

    :meth:`resolve` returns the concrete map (``load_into`` sets it as the model's
    ``hf_device_map``); sizes come from the checkpoint headers. With a model, tied weights
    reach every rank holding a module that uses them (a tied ``lm_head`` on the last rank gets
    the embedding's tensor).

    Example:
        >>> from distload import DeviceMap
        >>> from distload.shapes import MODELS, model_index
        >>> index = model_index(MODELS["llama-8b"])  # Llama-3-8B's shapes, no files needed
        >>> resolved = DeviceMap("auto").resolve(index.tensors, 2)
        >>> resolved["model.embed_tokens"], resolved["model.layers.31"], resolved["lm_head"]
        (0, 1, 1)
    """

    def __init__(
        self,
        device_map: Mapping[str, Target] | str,
        *,
        max_memory: Mapping[Any, int | str] | None = None,
        no_split: Sequence[str] = (),
        cpu_rank: int = 0,
        tree: ModuleTree | None = None,
    ) -> None:
        if device_map == "disk":
            raise PlacementError(f"device_map='disk': {_DISK}")
        if isinstance(device_map, str) and device_map not in _STRATEGIES:
            raise PlacementError(
                f"unknown device_map strategy {device_map!r}; valid: {list(_STRATEGIES)} or a "
                "dict of module prefix -> rank or 'cpu'"
            )
        if not isinstance(device_map, str):
            for key, value in device_map.items():
                if not isinstance(key, str):
                    raise PlacementError(f"device_map key {key!r} must be a module prefix")
                _check_target(value, key)
        self.device_map = device_map
        self.max_memory = parse_max_memory(max_memory)
        self.no_split = tuple(no_split)
        self.cpu_rank = cpu_rank
        self.tree = tree

    def for_model(self, model: torch.nn.Module) -> DeviceMap:
        """This map over ``model``'s modules (collective-free; every rank calls it alike)."""
        if self.no_split:
            classes = {type(m).__name__ for m in model.modules()}
            paths = {n for n, _ in model.named_modules()}
            unknown = [e for e in self.no_split if e not in classes and e not in paths]
            if unknown:
                raise PlacementError(
                    f"no_split entries {unknown} name no class and no module path of "
                    f"{type(model).__name__}"
                )
        no_split = self.no_split or tuple(default_no_split(model))
        tree = module_tree(model, no_split)
        return DeviceMap(
            self.device_map,
            max_memory=self.max_memory,
            no_split=self.no_split,
            cpu_rank=self.cpu_rank,
            tree=tree,
        )

    def resolve(self, tensors: Sequence[TensorMeta], world_size: int) -> dict[str, Target]:
        """The concrete ``{module prefix: rank or "cpu"}`` map for this checkpoint."""
        if not isinstance(self.device_map, str):
            return dict(self.device_map)
        units = self._units(tensors)
        limit = {r: self.max_memory.get(r, 2**62) for r in range(world_size)}
        targets = _assign([n for _, n in units], self.device_map, limit)
        out = {prefix: target for (prefix, _), target in zip(units, targets, strict=True)}
        cpu_bytes = sum(n for (_, n), t in zip(units, targets, strict=True) if t == "cpu")
        cpu_room = self.max_memory.get("cpu", 2**62)
        if cpu_bytes > cpu_room:
            raise PlacementError(
                f"device_map {self.device_map!r}: {cpu_bytes} bytes do not fit max_memory "
                f"(ranks {limit}, cpu {cpu_room})"
            )
        return out

    def _units(self, tensors: Sequence[TensorMeta]) -> list[tuple[str, int]]:
        """(module prefix, bytes) of the units that move whole, in the model's order."""
        if self.tree is not None:
            size = {meta.name: meta.nbytes for meta in tensors}
            return [(p, sum(size.get(n, 0) for n in names)) for p, names in self.tree.units]
        blocks = group_blocks(tensors)
        for entry in self.no_split:
            if not any(covers(entry, b.prefix) or covers(b.prefix, entry) for b in blocks):
                raise PlacementError(
                    f"no_split entry {entry!r} names no module of the checkpoint"
                    + (
                        " (class names need the model: use load_into or from_pretrained)"
                        if "." not in entry and entry[:1].isupper()
                        else ""
                    )
                )
        units: dict[str, int] = {}  # a no_split module gathers all its blocks, first place
        for block in blocks:
            prefix = longest_prefix(block.prefix, self.no_split) or block.prefix
            units[prefix] = units.get(prefix, 0) + block.nbytes
        return list(units.items())

    def layouts(self, tensors: Sequence[TensorMeta], world_size: int) -> list[Layout]:
        mapping = self.resolve(tensors, world_size)
        for key, value in mapping.items():
            _check_target(value, key, world_size)
        unit_of = self.tree.unit_of() if self.tree is not None else {}
        tie_of = self.tree.tie_of() if self.tree is not None else {}
        layouts, uncovered = [], []
        for meta in tensors:
            owners = [
                _owner(n, mapping, unit_of)
                for n in tie_of.get(meta.name, (meta.name,))
                if n == meta.name or n in unit_of
            ]
            if None in owners:
                uncovered.append(meta.name)
                layouts.append(Layout())
                continue
            if all(t == "cpu" for t in owners):
                layouts.append(Layout(None, 1, (self.cpu_rank,), host=True))
                continue
            ranks = sorted({self.cpu_rank if t == "cpu" else int(t) for t in owners})  # type: ignore[arg-type]
            layouts.append(Layout(None, 1, tuple(ranks)))
        if uncovered:
            raise PlacementError(
                f"device_map covers no entry for {len(uncovered)} tensor(s): "
                f"{uncovered[:8]}{' ...' if len(uncovered) > 8 else ''}",
                tensor=uncovered[0],
            )
        return layouts

    def describe(self) -> str:
        if isinstance(self.device_map, str):
            return f"device_map={self.device_map!r}"
        return f"device_map with {len(self.device_map)} entries"


def _owner(name: str, mapping: Mapping[str, Target], unit_of: Mapping[str, str]) -> Target | None:
    """Where tensor ``name`` goes: its model unit's target, else its longest prefix's."""
    unit = unit_of.get(name)
    if unit is not None and unit in mapping:
        return mapping[unit]
    prefix = longest_prefix(name, mapping)
    return None if prefix is None else mapping[prefix]


def _assign(sizes: Sequence[int], strategy: str, limit: Mapping[int, int]) -> list[Target]:
    """A target per unit, never going back: a unit that does not fit moves on to the next
    rank (past the last: ``"cpu"``), and so does everything after it."""
    ranks = list(limit)
    if strategy == "balanced_low_0" and len(ranks) > 1:
        ranks = ranks[1:]
    sequential = strategy == "sequential"
    runs = [0] * len(sizes) if sequential else split_contiguous(sizes, len(ranks))
    used = dict.fromkeys(ranks, 0)
    at, out = 0, list[Target]()
    for size, run in zip(sizes, runs, strict=True):
        at = max(at, run)
        while at < len(ranks) and used[ranks[at]] + size > limit[ranks[at]]:
            at += 1
        if at < len(ranks):
            used[ranks[at]] += size
            out.append(ranks[at])
        else:
            out.append("cpu")
    return out


def _check_target(value: object, key: str, world_size: int | None = None) -> None:
    if value == "cpu":
        return
    if value == "disk":
        raise PlacementError(f"device_map[{key!r}] = 'disk': {_DISK}")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PlacementError(f"device_map[{key!r}] = {value!r}: expected a rank or 'cpu'")
    if world_size is not None and value >= world_size:
        raise PlacementError(
            f"device_map[{key!r}] = {value}, but the group has ranks 0..{world_size - 1}"
        )
