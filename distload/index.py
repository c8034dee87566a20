"""The index records: what a checkpoint holds, as the coordinator validated it.

Plain frozen dataclasses, imported by every phase (placement, planning, execution); the parser
that produces them lives in ``distload.checkpoint`` (local files) and ``distload.hub.remote``
(Hub range requests). Nothing here imports torch. A :class:`CheckpointIndex` travels from rank
0 to every rank as JSON inside the load plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from distload.dtypes import ITEMSIZE


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of the checkpoint, as read from its file's header."""

    name: str  # full tensor name, e.g. "model.layers.0.self_attn.q_proj.weight"
    file: str  # file name relative to the checkpoint root
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]  # logical shape
    offset: int  # absolute byte offset of the data inside the file
    nbytes: int  # byte count of the data

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along dim 0 (the whole tensor for 0-d tensors)."""
        if not self.shape:
            return self.nbytes
        return math.prod(self.shape[1:]) * self.itemsize


@dataclass(frozen=True)
class FileMeta:
    """One safetensors file of the checkpoint."""

    name: str  # relative to the checkpoint root
    size: int  # file size in bytes
    header_bytes: int  # 8 + JSON header length: data starts here
    # sha256 of the file's first ``header_bytes`` bytes (length prefix and JSON header), so a
    # reader can tell that the file it opens is the one planned ("": not known)
    header_digest: str = ""


@dataclass(frozen=True)
class CheckpointIndex:
    """The validated description of a checkpoint (what the coordinator shares with all ranks)."""

    root: str  # absolute path of the checkpoint folder
    files: tuple[FileMeta, ...]
    tensors: tuple[TensorMeta, ...]  # ordered by (file, offset): the order reads happen in
    metadata: dict[str, str]  # the safetensors ``__metadata__`` of the first file

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        files = [f.name for f in self.files]
        pos = {name: i for i, name in enumerate(files)}
        return {
            "root": self.root,
            "files": [[f.name, f.size, f.header_bytes, f.header_digest] for f in self.files],
            "tensors": [
                [t.name, pos[t.file], t.dtype, list(t.shape), t.offset, t.nbytes]
                for t in self.tensors
            ],
            "metadata": self.metadata,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> CheckpointIndex:
        files = tuple(FileMeta(*f) for f in data["files"])
        tensors = tuple(
            TensorMeta(name, files[fi].name, dt, tuple(shape), off, nb)
            for name, fi, dt, shape, off, nb in data["tensors"]
        )
        return CheckpointIndex(data["root"], files, tensors, dict(data["metadata"]))
