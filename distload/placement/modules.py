"""Module structure recovered from tensor names alone (no model needed).

Used by the pipeline and device-map placements to balance whole modules by bytes: a *block*
is a decoder layer (the name up to its first integer component, e.g. ``model.layers.3``) or,
for tensors outside numbered layers, the module beside the layer stack that holds them
(``model.embed_tokens``, ``bert.embeddings``, ``lm_head``). Blocks are ordered as a model
runs: embeddings first, numbered layers in numeric order, then everything else (final norm,
head).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from distload.index import TensorMeta

_EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings")


@dataclass
class Block:
    """A group of tensors that belongs to one module and moves as one unit."""

    prefix: str  # module path, e.g. "model.layers.3"
    layer: int | None  # layer number, for numbered layers
    tensors: list[int] = field(default_factory=list)  # indices into the tensor list
    nbytes: int = 0


def block_key(name: str, roots: Sequence[tuple[str, ...]] = ()) -> tuple[str, int | None]:
    """(block prefix, layer number or None) of a tensor name.

    A tensor inside a numbered layer belongs to that layer (``model.layers.3``). Any other
    belongs to the module one level below where its path leaves the layer stacks' paths
    (``roots``, e.g. ``("bert", "encoder", "layer")``): ``bert.embeddings`` for all of BERT's
    embedding tensors (word, position, type and their LayerNorm move as one), ``model.norm``,
    ``lm_head``. Without roots: its parent module.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1]), int(part)
    if roots:
        shared = max(_common(parts, root) for root in roots)
        return ".".join(parts[: min(shared + 1, len(parts))]), None
    return ".".join(parts[:-1]) or name, None


def _common(parts: Sequence[str], root: Sequence[str]) -> int:
    n = 0
    while n < min(len(parts) - 1, len(root)) and parts[n] == root[n]:
        n += 1
    return n


def layer_roots(names: Iterable[str]) -> list[tuple[str, ...]]:
    """The paths of numbered layer stacks (``("model", "layers")``), in first-seen order."""
    roots: dict[tuple[str, ...], None] = {}
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                roots.setdefault(tuple(parts[:i]), None)
                break
    return list(roots)


def is_embedding(prefix: str) -> bool:
    last = prefix.rsplit(".", 1)[-1]
    return any(h in last for h in _EMBEDDING_HINTS)


def group_blocks(tensors: Sequence[TensorMeta]) -> list[Block]:
    """Blocks in execution order: embeddings, layers by number, the rest in checkpoint order."""
    blocks: dict[str, Block] = {}
    roots = layer_roots(meta.name for meta in tensors)
    for i, meta in enumerate(tensors):
        prefix, layer = block_key(meta.name, roots)
        block = blocks.setdefault(prefix, Block(prefix, layer))
        block.tensors.append(i)
        block.nbytes += meta.nbytes

    def order(b: Block) -> tuple[int, str, int]:
        if b.layer is not None:
            return (1, b.prefix.rsplit(".", 1)[0], b.layer)
        return (0 if is_embedding(b.prefix) else 2, "", 0)

    return sorted(blocks.values(), key=order)


def covers(prefix: str, name: str) -> bool:
    """Whether module ``prefix`` contains tensor ``name`` ("" covers everything)."""
    return prefix in ("", name) or name.startswith(prefix + ".")


def longest_prefix(name: str, prefixes: Iterable[str]) -> str | None:
    best = None
    for p in prefixes:
        if covers(p, name) and (best is None or len(p) > len(best)):
            best = p
    return best


def split_contiguous(sizes: Sequence[int], parts: int) -> list[int]:
    """Cut a sequence into ``parts`` contiguous runs balanced by size; returns run per item.

    Greedy on the running total: item i goes to run ``floor(midpoint_i / (total / parts))``,
    never decreasing and never leaving a run empty while items remain for it.
    """
    n = len(sizes)
    if n <= parts:
        return list(range(n))
    total = sum(sizes) or 1
    out: list[int] = []
    cum = 0
    for i, size in enumerate(sizes):
        mid = cum + size / 2
        run = min(parts - 1, int(mid * parts / total))
        if out:
            run = max(run, out[-1])
            run = min(run, out[-1] + 1)
        run = max(run, parts - (n - i))  # leave at least one item for every later run
        out.append(min(run, parts - 1))
        cum += size
    return out
