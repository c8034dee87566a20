"""A named ``dp x pp x tp`` mesh composing data, pipeline and tensor parallelism."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from distload.checkpoint import TensorMeta
from distload.errors import PlacementError
from distload.placement.base import Layout
from distload.placement.pipeline import PipelineParallel
from distload.placement.tensor_parallel import TensorParallel


class Mesh:
    """Compose data parallel x pipeline x tensor parallel over ``dp * pp * tp`` ranks.

    Ranks are laid out row-major over ``(dp, pp, tp)`` like ``init_device_mesh(..., (dp, pp,
    tp))``: rank = (d * pp + p) * tp + t. A rank receives the tensors of its pipeline stage,
    TP-sliced by ``tp_rules`` within its TP group, and replicas across DP hold the same.

    Args:
        dp, pp, tp: mesh sizes.
        tp_rules: TensorParallel rules (see :class:`~distload.TensorParallel`).
        stages: explicit pipeline stages (prefix lists); default ``pp`` stages balanced by
            bytes (see :class:`~distload.PipelineParallel`).
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
    ) -> None:
        for name, value in (("dp", dp), ("pp", pp), ("tp", tp)):
            if not isinstance(value, int) or value < 1:
                raise PlacementError(f"mesh size {name} must be a positive integer, got {value!r}")
        if stages is not None and len(stages) != pp:
            raise PlacementError(f"{len(stages)} stages given for pp={pp}")
        self.dp, self.pp, self.tp = dp, pp, tp
        self.tensor_parallel = TensorParallel(tp_rules or {}, size=tp)
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
        by_stages: dict[tuple[int, ...], tuple[int, ...]] = {}  # stages -> their ranks
        interned: dict[Layout, Layout] = {}  # one object per distinct layout
        out = []
        for meta, owners in zip(tensors, stages, strict=True):
            tp_layout = self.tensor_parallel.layout(meta, self.tp * self.dp)
            key = tuple(owners)
            holders = by_stages.get(key)
            if holders is None:
                holders = tuple(sorted(r for s in key for r in self.stage_ranks(s)))
                by_stages[key] = holders
            layout = Layout(tp_layout.dim, tp_layout.chunks, holders)
            out.append(interned.setdefault(layout, layout))
        return out

    def describe(self) -> str:
        return (
            f"mesh dp={self.dp} x pp={self.pp} x tp={self.tp}: "
            f"{self.pipeline.describe()}; {self.tensor_parallel.describe()}"
        )
