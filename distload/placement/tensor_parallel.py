"""Tensor parallelism as data: rules over tensor (or module) names -> shard or replicate.

Rules take torch's placements (``Shard(d)``, ``Replicate()``) or transformers' plan strings
(``"colwise"``, ``"rowwise"``, ``"colwise_gather_output"``, ``"embedding_rowwise"`` ...), with
torch's meaning per module kind: on a Linear ``colwise`` shards the output features (weight
``Shard(0)``, bias ``Shard(0)``) and ``rowwise`` the input features (weight ``Shard(-1)``, bias
replicated); on an embedding ``colwise`` shards the embedding dim (``Shard(1)``) and
``rowwise`` the vocabulary (``Shard(0)``), as ``ColwiseParallel`` / ``RowwiseParallel`` do on
``nn.Embedding``.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from distload.errors import PlacementError
from distload.index import TensorMeta
from distload.placement.base import REPLICATED, Layout
from distload.placement.from_model import loaded_dtensor
from distload.placement.modules import is_embedding

log = logging.getLogger(__name__)

# string -> what it does to a weight: "col" (output features), "row" (input features),
# "vocab"/"dim" (embedding rows / columns), None (replicate). transformers' names included.
STRING_RULES: dict[str, str | None] = {
    "colwise": "col",
    "rowwise": "row",
    "colwise_gather_output": "col",
    "colwise_rep": "col",
    "rowwise_split_input": "row",
    "rowwise_rep": "row",
    "embedding_rowwise": "vocab",
    "embedding_colwise": "dim",
    "replicate": None,
    "sequence_parallel": None,
    "replicated_with_grad_allreduce": None,
    "all_reduce": None,
}
# transformers styles whose weights are not one contiguous shard per rank
_UNSUPPORTED = {
    "packed_colwise": "it shards each half of a fused gate_up tensor: split it first "
    "(distload.Split) and shard the halves colwise",
    "packed_rowwise": "it shards each half of a fused tensor: split it first (distload.Split)",
    "moe_tp_experts": "it describes the experts' forward, not a weight layout",
    "grouped_gemm": "it describes the experts' forward, not a weight layout",
    "ep_dispatch_experts": "expert parallelism: use distload.ExpertParallel",
    "moe_identity_expert": "it describes the experts' forward, not a weight layout",
    "mla_kv_a_proj": "it is specific to transformers' MLA forward",
    "local_params": "it leaves per-rank parameters that transformers initialises itself",
}


def _torch_placement_dim(spec: object) -> tuple[bool, int | None]:
    """(is a torch placement, shard dim or None) for torch's Shard/Replicate objects."""
    module = loaded_dtensor()  # None: no Shard or Replicate object exists
    if module is None:
        return False, None
    if isinstance(spec, module.Shard):
        return True, spec.dim
    if isinstance(spec, module.Replicate):
        return True, None
    return False, None


def _shards(spec: Any) -> bool:
    """Whether a rule's placement cuts tensors (``colwise``, ``rowwise``, ``Shard(d)``)."""
    is_torch, dim = _torch_placement_dim(spec)
    return dim is not None if is_torch else STRING_RULES.get(spec) is not None


def string_dim(spec: str, name: str, ndim: int) -> int | None:
    """The dim a string rule shards tensor ``name`` (``ndim`` dims) along, or None."""
    kind = STRING_RULES[spec]
    module = name.rsplit(".", 1)[0]
    if kind in ("col", "row") and ndim == 2 and is_embedding(module):
        kind = "dim" if kind == "col" else "vocab"  # torch's styles on nn.Embedding
    if kind is None:
        return None
    if kind == "col":
        return 0
    if kind == "row":
        return -1 if ndim >= 2 else None  # a rowwise Linear's bias is replicated
    if kind == "vocab":
        return 0
    return 1 if ndim >= 2 else None  # "dim": embedding columns


# a module path matches a rule with any leading parts dropped (``model.`` before ``layers.*``):
# transformers' ``base_model_tp_plan`` keys are relative to the base model
_TAIL = r"(?s:(?:.*\.)?)"
# names whose rule one TensorParallel remembers (a checkpoint of 100k tensors: ~20 MB at most)
MATCH_CACHE = 200_000


class TensorParallel:
    """Shard tensors over tensor-parallel groups by name rules.

    Args:
        rules: maps fnmatch patterns to a placement. A pattern matches a full tensor name
            (``"*.q_proj.weight"``) or a module path (``"model.layers.*.self_attn.q_proj"``,
            as in transformers' ``tp_plan``; also without leading parts, as in
            ``config.base_model_tp_plan``); a module rule applies to its weight and bias.
            Placements: torch's ``Shard(dim)`` / ``Replicate()``, or the strings
            ``"colwise"`` / ``"rowwise"`` (torch's meaning: see the module docstring),
            ``"embedding_rowwise"`` (vocabulary, ``Shard(0)``), ``"embedding_colwise"``,
            ``"colwise_gather_output"``, ``"rowwise_split_input"``, ``"replicate"`` and the
            other transformers names that shard weights the same way. The first matching
            pattern wins (dict order); unmatched tensors are replicated.
        size: tensor-parallel degree. Defaults to the group size. When smaller, consecutive
            ranks form TP groups (rank ``r`` holds chunk ``r % size``) and the groups are
            data-parallel replicas; ``world_size`` must be a multiple of ``size``.

    Example:
        >>> from torch.distributed.tensor import Shard, Replicate
        >>> from distload import TensorParallel
        >>> tp = TensorParallel({"*.q_proj": "colwise", "*.o_proj.weight": "rowwise",
        ...                      "model.embed_tokens": "embedding_rowwise", "*norm*": Replicate()})
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
            if not is_torch and spec in _UNSUPPORTED:
                raise PlacementError(
                    f"rule {pattern!r}: transformers' {spec!r} is not a layout distload loads: "
                    f"{_UNSUPPORTED[spec]}"
                )
            if not is_torch and spec not in STRING_RULES:
                raise PlacementError(
                    f"rule {pattern!r}: unknown placement {spec!r}; valid: Shard(dim), "
                    f"Replicate(), {', '.join(repr(s) for s in STRING_RULES)}"
                )
        self.rules = dict(rules)
        self.size = size
        # per rule: (pattern, spec, matches a full name, matches a module path or its tail)
        self._compiled = [
            (
                p,
                spec,
                re.compile(fnmatch.translate(p)).match,
                re.compile(_TAIL + fnmatch.translate(p)).match,
            )
            for p, spec in self.rules.items()
        ]
        # name -> its rule: planning asks twice per tensor (its layout, the unmatched-rule
        # check), and a plan per load asks again (rank 0's serial time, while peers wait)
        self._matches: dict[str, tuple[str, Any] | None] = {}

    def match(self, name: str) -> tuple[str, Any] | None:
        """The first (pattern, placement) rule matching ``name`` or its module, if any."""
        if name in self._matches:
            return self._matches[name]
        found = None
        module = name.rpartition(".")[0]
        for pattern, spec, full, tail in self._compiled:
            if full(name) or (module and tail(module)):
                found = (pattern, spec)
                break
        if len(self._matches) < MATCH_CACHE:
            self._matches[name] = found
        return found

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
            dim = string_dim(spec, meta.name, ndim)
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
        that would shard but shard nothing at all are an error (another family's rules)."""
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
                "over tensor names or module paths like 'model.layers.*.self_attn.q_proj'"
            )
        return layouts

    def describe(self) -> str:
        rules = ", ".join(f"{p}: {s}" for p, s in self.rules.items())
        return f"tensor parallel (size={self.size or 'group'}) {{{rules}}}"
