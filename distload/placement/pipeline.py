"""Pipeline parallelism: each stage owns module prefixes; a rank receives only its stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distload.errors import PlacementError
from distload.index import TensorMeta
from distload.placement.base import Layout
from distload.placement.modules import covers, group_blocks, is_embedding, split_contiguous


class PipelineParallel:
    """Assign tensors to pipeline stages by module prefix.

    Args:
        stages: explicit stages, each a list of module prefixes (``"model.layers.0"``); a
            tensor goes to every stage with a prefix covering it (longest prefix per stage),
            so listing a tied module in two stages sends it to both.
        num_stages: instead of ``stages``: numbered layers are cut into ``num_stages``
            contiguous runs balanced by bytes; embeddings go to the first stage, everything
            after the layers (final norm, head) to the last.
        tie_word_embeddings: with ``num_stages``, also send the input embedding to the last
            stage (its head reuses it). ``None``: given a model (``load_into``), when the
            model ties its head to its embedding; without one, when the checkpoint has no
            ``lm_head`` tensor and its layers are a decoder's (an encoder such as BERT has no
            head to tie).

    With one rank per stage, stage ``s`` is rank ``s``; inside :class:`~distload.Mesh` a
    stage is a group of ranks.

    Example:
        >>> from distload import PipelineParallel
        >>> from distload.planner import make_plan
        >>> from distload.shapes import MODELS, model_index
        >>> index = model_index(MODELS["llama-8b"])  # Llama-3-8B's shapes, no files needed
        >>> plan = make_plan(index, 2, PipelineParallel(num_stages=2))
        >>> [plan.local_shape(0, rank) for rank in (0, 1)]  # embed_tokens: stage 0 only
        [(128256, 4096), None]
    """

    def __init__(
        self,
        stages: Sequence[Sequence[str]] | None = None,
        *,
        num_stages: int | None = None,
        tie_word_embeddings: bool | None = None,
    ) -> None:
        if (stages is None) == (num_stages is None):
            raise PlacementError("give exactly one of stages=[[prefix, ...], ...] or num_stages=N")
        if num_stages is not None and num_stages < 1:
            raise PlacementError(f"num_stages must be >= 1, got {num_stages}")
        if stages is not None and not stages:
            raise PlacementError("stages must not be empty")
        self.stages = [list(s) for s in stages] if stages is not None else None
        self.num_stages = len(stages) if stages is not None else int(num_stages)  # type: ignore[arg-type]
        self.tie_word_embeddings = tie_word_embeddings

    def assign(self, tensors: Sequence[TensorMeta]) -> list[tuple[int, ...]]:
        """Stages of each tensor (sorted, non-empty); raises for uncovered tensors."""
        if self.stages is not None:
            out = []
            uncovered = []
            for meta in tensors:
                owners = tuple(
                    s
                    for s, prefixes in enumerate(self.stages)
                    if any(covers(p, meta.name) for p in prefixes)
                )
                if not owners:
                    uncovered.append(meta.name)
                out.append(owners)
            if uncovered:
                raise PlacementError(
                    f"{len(uncovered)} tensor(s) belong to no pipeline stage: "
                    f"{uncovered[:8]}{' ...' if len(uncovered) > 8 else ''}",
                    tensor=uncovered[0],
                )
            return out
        return self._auto(tensors)

    def _auto(self, tensors: Sequence[TensorMeta]) -> list[tuple[int, ...]]:
        last = self.num_stages - 1
        blocks = group_blocks(tensors)
        layers = [b for b in blocks if b.layer is not None]
        runs = split_contiguous([b.nbytes for b in layers], self.num_stages) if layers else []
        stage_of: dict[int, tuple[int, ...]] = {}
        for block, run in zip(layers, runs, strict=True):
            for t in block.tensors:
                stage_of[t] = (run,)
        tie = self.tie_word_embeddings
        if tie is None:
            has_head = any(m.name.split(".")[0] in ("lm_head", "output") for m in tensors)
            encoder = any("encoder" in b.prefix.split(".") for b in layers)
            tie = not has_head and not encoder
        for block in blocks:
            if block.layer is not None:
                continue
            if is_embedding(block.prefix):
                owners = (0, last) if tie and last and _word_embedding(block.prefix) else (0,)
            else:
                owners = (last,)
            for t in block.tensors:
                stage_of[t] = owners
        return [stage_of[i] for i in range(len(tensors))]

    def for_model(self, model: torch.nn.Module) -> PipelineParallel:
        """With ``tie_word_embeddings=None``: decided by whether ``model`` ties its output
        embedding to its input embedding (every rank calls it alike, no collective)."""
        if self.tie_word_embeddings is not None or self.stages is not None:
            return self
        from distload.placement.model_tree import module_tree

        embedding = getattr(model, "get_input_embeddings", lambda: None)()
        names = {f"{n}.weight" for n, m in model.named_modules() if m is embedding}
        tied = any(names & set(group) for group in module_tree(model, ()).ties)
        return PipelineParallel(num_stages=self.num_stages, tie_word_embeddings=tied)

    def layouts(self, tensors: Sequence[TensorMeta], world_size: int) -> list[Layout]:
        if world_size != self.num_stages:
            raise PlacementError(
                f"pipeline with one rank per stage needs world_size == stages: "
                f"pp({self.num_stages}) != world_size({world_size}); use distload.Mesh to "
                "combine stages with data or tensor parallelism"
            )
        return [Layout(None, 1, owners) for owners in self.assign(tensors)]

    def describe(self) -> str:
        if self.stages is not None:
            return f"pipeline, {self.num_stages} explicit stages"
        return f"pipeline, {self.num_stages} stages balanced by bytes"


def _word_embedding(prefix: str) -> bool:
    """An input embedding a head may reuse (not a position or token-type embedding)."""
    last = prefix.rsplit(".", 1)[-1]
    return "position" not in last and "type" not in last and last != "wpe"
