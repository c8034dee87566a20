"""Tensor parallelism as data: fnmatch rules over tensor names -> shard or replicate."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from distload.errors import PlacementError
from distload.index import TensorMeta
from distload.placement.base import REPLICATED, Layout

_STRING_RULES = ("colwise", "rowwise", "replicate")

log = logging.getLogger(__name__)


def _torch_placement_dim(spec: object) -> tuple[bool, int | None]:
    """(is a torch placement, shard dim or None) for torch's Shard/Replicate objects."""
    try:
        from torch.distributed.tensor import Replicate, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return False, None
    if isinstance(spec, Shard):
        return True, spec.dim
    if isinstance(spec, Replicate):
        return True, None
    return False, None


def _shards(spec: Any) -> bool:
    """Whether a rule's placement cuts tensors (``colwise``, ``rowwise``, ``Shard(d)``)."""
    is_torch, dim = _torch_placement_dim(spec)
    return dim is not None if is_torch else spec in ("colwise", "rowwise")


class TensorParallel:
    """Shard tensors over tensor-parallel groups by name rules.

    Args:
        rules: maps fnmatch patterns over full tensor names to a placement: torch's
            ``Shard(dim)`` / ``Replicate()`` (``torch.distributed.tensor``), or the strings
            ``"colwise"`` (``Shard(0)``: output features of a Linear weight, and its bias),
            ``"rowwise"`` (``Shard(-1)`` of a >=2-d weight; 1-d tensors such as the bias are
            replicated) or ``"replicate"``. The first matching pattern wins (dict order);
            unmatched tensors are replicated.
        size: tensor-parallel degree. Defaults to the group size. When smaller, consecutive
            ranks form TP groups (rank ``r`` holds chunk ``r % size``) and the groups are
            data-parallel replicas; ``world_size`` must be a multiple of ``size``.

    Example:
        >>> from torch.distributed.tensor import Shard, Replicate
        >>> from distload import TensorParallel
        >>> tp = TensorParallel({"*.q_proj.weight": "colwise", "*.o_proj.weight": "rowwise",
        ...                      "model.embed_tokens.weight": Shard(0), "*norm*": Replicate()})
        >>> from distload.planner import make_plan
        >>> from distload.shapes import MODELS, model_index
        >>> plan = make_plan(model_index(MODELS["llama-8b"]), 4, tp)
        >>> plan.local_shape(0, 3)  # a quarter of embed_tokens' rows on each rank
        (32064, 4096)
    """

    def __init__(self, rules: Mapping[str, Any], size: int | None = None) -> None:
        if size is not None and (not isinstance(size, int) or size < 1):
            raise PlacementError(f"TensorParallel size must be a positive integer, got {size!r}")
        for pattern, spec in rules.items():
            if not isinstance(pattern, str):
                raise PlacementError(f"rule pattern must be a string, got {pattern!r}")
            is_torch, _ = _torch_placement_dim(spec)
            if not is_torch and spec not in _STRING_RULES:
                raise PlacementError(
                    f"rule {pattern!r}: unknown placement {spec!r}; valid: Shard(dim), "
                    f"Replicate(), {', '.join(repr(s) for s in _STRING_RULES)}"
                )
        self.rules = dict(rules)
        self.size = size

    def match(self, name: str) -> tuple[str, Any] | None:
        """The first (pattern, placement) rule matching ``name``, if any."""
        for pattern, spec in self.rules.items():
            if fnmatch.fnmatchcase(name, pattern):
                return pattern, spec
        return None

    def layout(self, meta: TensorMeta, world_size: int) -> Layout:
        size = self.size or world_size
        if world_size % size:
            raise PlacementError(
                f"tensor-parallel size {size} does not divide the group size {world_size} "
                f"(world_size({world_size}) % tp({size}) = {world_size % size})"
            )
        found = self.match(meta.name)
        if found is None:
            return REPLICATED
        pattern, spec = found
        ndim = len(meta.shape)
        is_torch, dim = _torch_placement_dim(spec)
        if not is_torch:
            if spec == "replicate":
                dim = None
            elif spec == "colwise":
                dim = 0
            else:  # rowwise
                dim = -1 if ndim >= 2 else None
        if dim is None or size == 1:
            return REPLICATED
        if not -ndim <= dim < ndim:
            raise PlacementError(
                f"rule {pattern!r} -> {spec!r} shards dim {dim}, but tensor {meta.name!r} has "
                f"shape {list(meta.shape)} ({ndim} dims; valid dims {-ndim}..{ndim - 1})"
                if ndim
                else f"rule {pattern!r} -> {spec!r} cannot shard 0-d tensor {meta.name!r}",
                tensor=meta.name,
            )
        return Layout(dim % ndim, size, None)

    def layouts(self, tensors: Sequence[TensorMeta], world_size: int) -> list[Layout]:
        """Every tensor's layout. Rules that match no tensor are logged as a warning; rules
        that would shard but shard nothing at all are an error (module paths such as
        transformers' ``base_model_tp_plan`` keys match no tensor name)."""
        layouts = [self.layout(meta, world_size) for meta in tensors]
        matched = {found[0] for meta in tensors if (found := self.match(meta.name))}
        unmatched = [p for p in self.rules if p not in matched]
        if unmatched:
            log.warning(
                "TensorParallel: %d rule(s) match no tensor of the checkpoint: %s",
                len(unmatched),
                unmatched[:8],
            )
        sharding = [p for p, spec in self.rules.items() if _shards(spec)]
        size = self.size or world_size
        if tensors and sharding and size > 1 and all(lay.dim is None for lay in layouts):
            example = tensors[0].name
            raise PlacementError(
                f"TensorParallel shards no tensor: none of its rules {sharding[:4]} matches a "
                f"tensor name of the checkpoint (e.g. {example!r}); rules are fnmatch patterns "
                "over full tensor names like 'model.layers.*.self_attn.q_proj.weight'"
            )
        return layouts

    def describe(self) -> str:
        rules = ", ".join(f"{p}: {s}" for p, s in self.rules.items())
        return f"tensor parallel (size={self.size or 'group'}) {{{rules}}}"
