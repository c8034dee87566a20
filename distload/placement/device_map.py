"""Hugging Face / accelerate style ``device_map`` placements over the ranks of a job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from distload.errors import PlacementError
from distload.index import TensorMeta
from distload.placement.base import Layout
from distload.placement.modules import group_blocks, longest_prefix, split_contiguous

Target = int | str  # a rank, or "cpu"
_STRATEGIES = ("auto", "balanced", "sequential")


class DeviceMap:
    """Place whole modules on ranks, like ``from_pretrained(device_map=...)``.

    Args:
        device_map: ``{"model.layers.1": 0, "lm_head": "cpu", ...}``: keys are module prefixes
            (a prefix covers all tensors under it; the longest prefix wins; ``""`` covers
            everything); values are ranks or ``"cpu"``. Every tensor must be covered. Or one of
            ``"auto"``/``"balanced"`` (contiguous modules balanced by bytes over the ranks) and
            ``"sequential"`` (fill rank 0 up to its ``max_memory``, then rank 1, ...).
        max_memory: ``{rank or "cpu": bytes}`` limits for the automatic maps; what fits on no
            rank goes to ``"cpu"`` (or fails when ``"cpu"`` has no room either).
        no_split: module prefixes that must stay whole. Numbered layers (``model.layers.3``)
            and the parent module of other tensors are never split anyway.
        cpu_rank: rank whose host memory holds ``"cpu"`` entries.

    :meth:`resolve` returns the concrete map (printable like ``model.hf_device_map``); sizes
    come from the checkpoint headers, so no model is needed to plan.

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
        max_memory: Mapping[Target, int] | None = None,
        no_split: Sequence[str] = (),
        cpu_rank: int = 0,
    ) -> None:
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
        self.max_memory = dict(max_memory or {})
        self.no_split = tuple(no_split)
        self.cpu_rank = cpu_rank

    def resolve(self, tensors: Sequence[TensorMeta], world_size: int) -> dict[str, Target]:
        """The concrete ``{module prefix: rank or "cpu"}`` map for this checkpoint."""
        if not isinstance(self.device_map, str):
            return dict(self.device_map)
        blocks = _merge_no_split(group_blocks(tensors), self.no_split)
        limit = {r: self.max_memory.get(r, 2**62) for r in range(world_size)}
        cpu_room = self.max_memory.get("cpu", 2**62)
        out: dict[str, Target] = {}
        if self.device_map == "sequential":
            rank, used = 0, [0] * world_size
            for prefix, nbytes in blocks:
                while rank < world_size and used[rank] + nbytes > limit[rank]:
                    rank += 1
                if rank < world_size:
                    used[rank] += nbytes
                    out[prefix] = rank
                else:
                    out[prefix] = "cpu"
        else:
            runs = split_contiguous([n for _, n in blocks], world_size)
            used = [0] * world_size
            for (prefix, nbytes), run in zip(blocks, runs, strict=True):
                target: Target = run
                while isinstance(target, int) and used[target] + nbytes > limit[target]:
                    target = target + 1 if target + 1 < world_size else "cpu"
                if isinstance(target, int):
                    used[target] += nbytes
                out[prefix] = target
        cpu_bytes = sum(n for p, n in blocks if out[p] == "cpu")
        if cpu_bytes > cpu_room:
            raise PlacementError(
                f"device_map {self.device_map!r}: {cpu_bytes} bytes do not fit max_memory "
                f"(ranks {limit}, cpu {cpu_room})"
            )
        return out

    def layouts(self, tensors: Sequence[TensorMeta], world_size: int) -> list[Layout]:
        mapping = self.resolve(tensors, world_size)
        for key, value in mapping.items():
            _check_target(value, key, world_size)
        layouts, uncovered = [], []
        for meta in tensors:
            prefix = longest_prefix(meta.name, mapping)
            if prefix is None:
                uncovered.append(meta.name)
                layouts.append(Layout())
                continue
            target = mapping[prefix]
            if target == "cpu":
                layouts.append(Layout(None, 1, (self.cpu_rank,), host=True))
            else:
                layouts.append(Layout(None, 1, (int(target),)))
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


def _check_target(value: object, key: str, world_size: int | None = None) -> None:
    if value == "cpu":
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PlacementError(f"device_map[{key!r}] = {value!r}: expected a rank or 'cpu'")
    if world_size is not None and value >= world_size:
        raise PlacementError(
            f"device_map[{key!r}] = {value}, but the group has ranks 0..{world_size - 1}"
        )


def _merge_no_split(blocks: list, no_split: Sequence[str]) -> list[tuple[str, int]]:
    """(prefix, bytes) units: blocks under a no_split prefix are merged into it."""
    units: list[tuple[str, int]] = []
    for block in blocks:
        prefix = longest_prefix(block.prefix, no_split) or block.prefix
        if units and units[-1][0] == prefix:
            units[-1] = (prefix, units[-1][1] + block.nbytes)
        else:
            units.append((prefix, block.nbytes))
    return units
