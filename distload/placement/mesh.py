"""A named ``dp x pp x tp`` mesh composing data, pipeline and tensor parallelism, with expert
parallelism for the routed experts of mixture-of-experts checkpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from distload.errors import PlacementError
from distload.index import TensorMeta
from distload.placement.base import Layout
from distload.placement.expert import (
    EXPERT_PATTERN,
    count_experts,
    find_experts,
    group_members,
    group_of,
)
from distload.placement.pipeline import PipelineParallel
from distload.placement.tensor_parallel import TensorParallel


class Mesh:
    """Compose data parallel x pipeline x tensor parallel over ``dp * pp * tp`` ranks.

    Ranks are laid out row-major over ``(dp, pp, tp)`` like ``init_device_mesh(..., (dp, pp,
    tp))``: rank = (d * pp + p) * tp + t. A rank receives the tensors of its pipeline stage,
    TP-sliced by ``tp_rules`` within its TP group, and replicas across DP hold the same.

    With ``ep``, routed experts (``...experts.<index>...``, see :mod:`distload.placement.expert`)
    are spread instead over the ``dp * tp`` ranks of their stage, Megatron-Core style: those
    ranks form ``ep`` expert groups of ``expert_tp`` ranks (times the expert-data-parallel
    replicas), expert ``e`` of ``E`` lives in group ``e // (E / ep)``, cut over its group's
    ``expert_tp`` ranks by ``tp_rules`` (whole when ``expert_tp`` is 1). E.g. ``Mesh(tp=8,
    ep=8, tp_rules=preset("qwen3_moe"))`` is vLLM's tensor-parallel attention with
    expert-parallel MoE layers on 8 GPUs.

    Args:
        dp, pp, tp: mesh sizes.
        tp_rules: TensorParallel rules (see :class:`~distload.TensorParallel`).
        stages: explicit pipeline stages (prefix lists); default ``pp`` stages balanced by
            bytes (see :class:`~distload.PipelineParallel`).
        ep: expert-parallel groups per stage (None: experts follow ``tp_rules`` like every
            other tensor). ``ep * expert_tp`` must divide ``dp * tp``.
        expert_tp: ranks each expert is cut over inside its group (default 1: whole).
        num_experts: experts per MoE layer (default: the highest index in the checkpoint plus
            one; give it when loading a subset of the experts with ``keys=``).
        expert_pattern: regular expression whose first group is a routed expert's index.

    Example:
        >>> from distload import Mesh, preset
        >>> from distload.planner import make_plan
        >>> from distload.shapes import MODELS, model_index
        >>> index = model_index(MODELS["llama-8b"])  # Llama-3-8B's shapes, no files needed
        >>> plan = make_plan(index, 8, Mesh(dp=2, pp=2, tp=2, tp_rules=preset("llama")))
        >>> plan.local_shape(0, 0)  # embed_tokens on rank 0: stage 0, half of the rows
        (64128, 4096)
        >>> plan.local_shape(0, 2) is None  # rank 2 = (dp 0, stage 1, tp 0)
        True
    """

    def __init__(
        self,
        *,
        dp: int = 1,
        pp: int = 1,
        tp: int = 1,
        tp_rules: Mapping[str, Any] | None = None,
        stages: Sequence[Sequence[str]] | None = None,
        tie_word_embeddings: bool | None = None,
        ep: int | None = None,
        expert_tp: int = 1,
        num_experts: int | None = None,
        expert_pattern: str = EXPERT_PATTERN,
    ) -> None:
        sizes = (
            ("dp", dp),
            ("pp", pp),
            ("tp", tp),
            ("ep", 1 if ep is None else ep),
            ("expert_tp", expert_tp),
        )
        for name, value in sizes:
            if not isinstance(value, int) or value < 1:
                raise PlacementError(f"mesh size {name} must be a positive integer, got {value!r}")
        if ep is not None and (dp * tp) % (ep * expert_tp):
            raise PlacementError(
                f"ep({ep}) * expert_tp({expert_tp}) = {ep * expert_tp} does not divide the "
                f"dp({dp}) * tp({tp}) = {dp * tp} ranks of a pipeline stage"
            )
        if num_experts is not None and (not isinstance(num_experts, int) or num_experts < 1):
            raise PlacementError(f"num_experts must be a positive integer, got {num_experts!r}")
        if stages is not None and len(stages) != pp:
            raise PlacementError(f"{len(stages)} stages given for pp={pp}")
        self.dp, self.pp, self.tp = dp, pp, tp
        self.ep, self.expert_tp = ep, expert_tp
        self.num_experts, self.expert_pattern = num_experts, expert_pattern
        self.tensor_parallel = TensorParallel(tp_rules or {}, size=tp)
        self.expert_parallel = TensorParallel(tp_rules or {}, size=expert_tp)
        self.pipeline = (
            PipelineParallel(stages, tie_word_embeddings=tie_word_embeddings)
            if stages is not None
            else PipelineParallel(num_stages=pp, tie_word_embeddings=tie_word_embeddings)
        )

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp, pp, tp) coordinates of ``rank``."""
        return rank // (self.pp * self.tp), rank // self.tp % self.pp, rank % self.tp

    def stage_ranks(self, stage: int) -> list[int]:
        return [r for r in range(self.dp * self.pp * self.tp) if self.coords(r)[1] == stage]

    def layouts(self, tensors: Sequence[TensorMeta], world_size: int) -> list[Layout]:
        size = self.dp * self.pp * self.tp
        if size != world_size:
            raise PlacementError(
                f"mesh dp({self.dp}) * pp({self.pp}) * tp({self.tp}) = {size} != "
                f"world_size({world_size})"
            )
        stages = self.pipeline.assign(tensors)
        experts: list[tuple[str, int] | None] = [None] * len(tensors)
        counts: dict[str, int] = {}
        if self.ep is not None:
            experts = find_experts(tensors, self.expert_pattern)
            counts = count_experts(tensors, experts, self.ep, self.num_experts)
        by_stages: dict[tuple[int, ...], tuple[int, ...]] = {}  # stages -> their ranks
        by_group: dict[tuple[tuple[int, ...], int], tuple[int, ...]] = {}  # (stages, group)
        interned: dict[Layout, Layout] = {}  # one object per distinct layout
        out = []
        for meta, owners, expert in zip(tensors, stages, experts, strict=True):
            key = tuple(owners)
            if expert is not None:
                assert self.ep is not None
                group = group_of(expert[1], counts[expert[0]], self.ep)
                holders = by_group.get((key, group))
                if holders is None:
                    holders = self._group_ranks(key, group)
                    by_group[(key, group)] = holders
                tp_layout = self.expert_parallel.layout(meta, self.expert_tp)
            else:
                holders = by_stages.get(key)
                if holders is None:
                    holders = tuple(sorted(r for s in key for r in self.stage_ranks(s)))
                    by_stages[key] = holders
                tp_layout = self.tensor_parallel.layout(meta, self.tp * self.dp)
            layout = Layout(tp_layout.dim, tp_layout.chunks, holders)
            out.append(interned.setdefault(layout, layout))
        return out

    def _group_ranks(self, stages: tuple[int, ...], group: int) -> tuple[int, ...]:
        """Ranks of expert group ``group`` in each of ``stages``, stage by stage (each stage's
        list is a whole number of ``expert_tp`` blocks, so position ``p`` is expert-TP rank
        ``p % expert_tp`` throughout)."""
        assert self.ep is not None
        return tuple(
            r
            for s in stages
            for r in group_members(self.stage_ranks(s), self.ep, self.expert_tp)[group]
        )

    def describe(self) -> str:
        experts = ""
        if self.ep is not None:
            experts = f", experts over ep={self.ep} x expert_tp={self.expert_tp}"
        return (
            f"mesh dp={self.dp} x pp={self.pp} x tp={self.tp}{experts}: "
            f"{self.pipeline.describe()}; {self.tensor_parallel.describe()}"
        )


class ExpertParallel:
    """Expert parallelism over the whole group: routed experts spread over ``ep`` groups, every
    other tensor laid out by ``tp_rules`` over the group (replicated where no rule matches).

    The group's ranks form ``ep`` expert groups of ``expert_tp`` consecutive ranks (times
    the replicas when ``ep * expert_tp`` is smaller than the group); expert ``e`` of ``E``
    lives in group ``e // (E / ep)``. It is ``Mesh(tp=world, ep=ep, ...)``: e.g.
    ``ExpertParallel(tp_rules=preset("qwen3_moe"))`` on 8 ranks is vLLM's tensor-parallel
    attention with the experts spread one eighth per GPU, and ``ExpertParallel()`` alone gives
    replicated attention (data-parallel attention) with expert-parallel MoE layers.

    Args:
        ep: expert groups (default: the group size divided by ``expert_tp``).
        tp_rules, expert_tp, num_experts, expert_pattern: as for :class:`Mesh`.
    """

    def __init__(
        self,
        ep: int | None = None,
        *,
        tp_rules: Mapping[str, Any] | None = None,
        expert_tp: int = 1,
        num_experts: int | None = None,
        expert_pattern: str = EXPERT_PATTERN,
    ) -> None:
        for name, value in (("ep", 1 if ep is None else ep), ("expert_tp", expert_tp)):
            if not isinstance(value, int) or value < 1:
                raise PlacementError(f"{name} must be a positive integer, got {value!r}")
        self.ep, self.expert_tp = ep, expert_tp
        self.tp_rules = dict(tp_rules or {})
        self.num_experts, self.expert_pattern = num_experts, expert_pattern

    def mesh(self, world_size: int) -> Mesh:
        """The :class:`Mesh` this placement is on a group of ``world_size`` ranks."""
        ep = self.ep if self.ep is not None else max(1, world_size // self.expert_tp)
        return Mesh(
            tp=world_size,
            tp_rules=self.tp_rules,
            ep=ep,
            expert_tp=self.expert_tp,
            num_experts=self.num_experts,
            expert_pattern=self.expert_pattern,
        )

    def layouts(self, tensors: Sequence[TensorMeta], world_size: int) -> list[Layout]:
        return self.mesh(world_size).layouts(tensors, world_size)

    def describe(self) -> str:
        rules = TensorParallel(self.tp_rules).describe()
        ep = self.ep if self.ep is not None else "group / expert_tp"
        return f"expert parallel ep={ep} x expert_tp={self.expert_tp}; others: {rules}"
