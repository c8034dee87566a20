"""Checkpoint sources, safetensors header and index parsing, validation -> :class:`TensorMeta`.

Runs on the coordinator only (rank 0 of the load's group). It reads the index and the
safetensors *headers* -- never tensor data -- checks every invariant a loader relies on, and
produces a :class:`CheckpointIndex`, a compact description that travels to the other ranks as
JSON inside the load plan. Nothing here imports torch.

Checks, each raising :class:`~distload.errors.CheckpointError` naming the file and tensor:

* source exists; a folder holds ``model.safetensors.index.json`` or ``model.safetensors``;
  pickle-based checkpoints (``.bin``/``.pt``) are refused with a pointer to safetensors;
* index is a JSON object with a ``weight_map`` of str -> str; every file named stays inside the
  folder (no absolute paths, no ``..``, no symlink escaping it) and is a regular file;
* header length is within ``max_header_bytes`` and the file; the header is a JSON object without
  duplicate keys; every entry has a known dtype, a shape of non-negative ints and two ordered
  ``data_offsets`` whose span equals ``prod(shape) * itemsize``; the data region is covered
  exactly (no overlap, no gap, no truncation, no trailing bytes);
* every tensor of the ``weight_map`` is in its file's header; ``metadata.total_size`` (when
  given) equals the byte count of the mapped tensors.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distload.errors import CheckpointError
from distload.headers import DEFAULT_MAX_HEADER_BYTES, is_int, read_header
from distload.index import CheckpointIndex, FileMeta, TensorMeta
from distload.locate import (
    INDEX_NAME,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    Source,
    refuse_pickle,
    resolve_source,
    safe_member,
)

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "INDEX_NAME",
    "SINGLE_NAME",
    "CheckpointIndex",
    "FileMeta",
    "Source",
    "TensorMeta",
    "read_checkpoint",
    "read_header",
    "resolve_source",
]

log = logging.getLogger(__name__)

MAX_INDEX_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# headers


# --------------------------------------------------------------------------------------------
# index


def _read_index(path: Path) -> tuple[dict[str, str], int | None]:
    where = path.name
    try:
        size = path.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise CheckpointError(
                f"{where}: index is {size} bytes, more than the {MAX_INDEX_BYTES}-byte limit",
                file=where,
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read index ({exc})", file=where) from None
    return parse_index(raw, where)


def parse_index(raw: bytes, where: str) -> tuple[dict[str, str], int | None]:
    """Validate the bytes of a ``model.safetensors.index.json``: its ``weight_map`` (tensor
    name -> file name) and ``metadata.total_size`` (None when absent)."""
    if len(raw) > MAX_INDEX_BYTES:
        raise CheckpointError(
            f"{where}: index is {len(raw)} bytes, more than the {MAX_INDEX_BYTES}-byte limit",
            file=where,
        )
    twice: list[tuple[str, Any, Any]] = []  # keys an object lists twice (json keeps the last)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                twice.append((key, out[key], value))
            out[key] = value
        return out

    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{where}: cannot parse index ({type(exc).__name__}: {str(exc)[:200]})", file=where
        ) from None
    if twice:
        key, first, last = twice[0]
        raise CheckpointError(
            f"{where}: {key!r} is listed twice (as {str(first)[:80]!r} and {str(last)[:80]!r});"
            " an index must name each tensor once",
            file=where,
            tensor=key,
        )
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise CheckpointError(f"{where}: index must be an object with a 'weight_map'", file=where)
    weight_map = data["weight_map"]
    if not weight_map:
        raise CheckpointError(
            f"{where}: the weight_map is empty: the index names no tensor to load (a broken "
            "conversion? list each tensor's file, or remove the index to load a single "
            "model.safetensors)",
            file=where,
        )
    for tensor, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(
                f"{where}: weight_map[{tensor!r}] must be a file name, got {file!r}",
                file=where,
                tensor=tensor,
            )
    total = None
    metadata = data.get("metadata") or {}
    if isinstance(metadata, dict) and "total_size" in metadata:
        total = metadata["total_size"]
        if isinstance(total, float) and total.is_integer():
            total = int(total)
        if not is_int(total):
            raise CheckpointError(
                f"{where}: metadata.total_size must be an integer, got {total!r}", file=where
            )
    return weight_map, total


def _read_any_header(
    path: Path, display: str, max_header_bytes: int, allow_pickle: bool
) -> tuple[FileMeta, dict[str, TensorMeta], dict[str, str]]:
    if path.name.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            refuse_pickle(path.name, path)
        from distload.pickled import read_pickle_header

        fmeta, tensors = read_pickle_header(path, display)
        return fmeta, tensors, {"format": "pt-zip"}
    return read_header(path, display=display, max_header_bytes=max_header_bytes)


def read_checkpoint(
    source: str | os.PathLike[str] | Source,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    allow_pickle: bool = False,
    variant: str | None = None,
) -> CheckpointIndex:
    """Resolve ``source``, read and validate its index and headers (coordinator only).

    ``allow_pickle=True`` also accepts PyTorch zip checkpoints (``.bin``/``.pt``), described
    with the weights-only unpickler and never executed (see ``distload.pickled``).
    """
    src = (
        source
        if isinstance(source, Source)
        else resolve_source(source, allow_pickle=allow_pickle, variant=variant)
    )
    root = src.root
    if src.index_file is None:
        assert src.single_file is not None
        path = safe_member(root, src.single_file, where=str(root))
        return single_file_index(
            str(root), *_read_any_header(path, path.name, max_header_bytes, allow_pickle)
        )

    weight_map, total = _read_index(src.index_file)

    def header_of(file: str) -> tuple[FileMeta, dict[str, TensorMeta], dict[str, str]]:
        path = safe_member(root, file, where=src.index_file.name if src.index_file else "")
        return _read_any_header(path, file, max_header_bytes, allow_pickle)

    return assemble_index(str(root), src.index_file.name, weight_map, total, header_of)


def single_file_index(
    root: str, fmeta: FileMeta, tensors: dict[str, TensorMeta], meta: dict[str, str]
) -> CheckpointIndex:
    """The index of a one-file checkpoint: every tensor of its header, in file order."""
    ordered = sorted(tensors.values(), key=lambda t: (t.offset, t.name))
    return CheckpointIndex(root, (fmeta,), tuple(ordered), meta)


HeaderOf = Callable[[str], tuple[FileMeta, dict[str, TensorMeta], dict[str, str]]]


def assemble_index(
    root: str,
    where: str,
    weight_map: dict[str, str],
    total: int | None,
    header_of: HeaderOf,
) -> CheckpointIndex:
    """Join a validated ``weight_map`` with the headers of the files it names.

    ``header_of(file)`` returns a file's validated header (local read or remote range
    requests); ``where`` names the index in errors.
    """
    by_file: dict[str, list[str]] = {}
    for tensor, file in weight_map.items():
        by_file.setdefault(file, []).append(tensor)
    files: list[FileMeta] = []
    chosen: list[TensorMeta] = []
    first_meta: dict[str, str] = {}
    for file in sorted(by_file):
        fmeta, tensors, meta = header_of(file)
        first_meta = first_meta or meta
        files.append(fmeta)
        for tensor in by_file[file]:
            if tensor not in tensors:
                raise CheckpointError(
                    f"{where} maps tensor {tensor!r} to {file!r}, but that file's header has "
                    f"no such tensor ({len(tensors)} tensors in it)",
                    file=file,
                    tensor=tensor,
                )
            chosen.append(tensors[tensor])
        unmapped = set(tensors) - set(by_file[file])
        if unmapped:
            log.warning(
                "%s: %d tensor(s) in the header are not in %s and will not be loaded (e.g. %s)",
                file,
                len(unmapped),
                where,
                sorted(unmapped)[0],
            )
    mapped = sum(t.nbytes for t in chosen)
    if total is not None and total != mapped:
        raise CheckpointError(
            f"{where}: metadata.total_size is {total} bytes but the headers of the mapped "
            f"tensors add up to {mapped} bytes",
            file=where,
        )
    chosen.sort(key=lambda t: (t.file, t.offset, t.name))
    return CheckpointIndex(root, tuple(files), tuple(chosen), first_meta)
