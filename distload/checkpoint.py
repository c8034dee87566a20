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

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distload.dtypes import ITEMSIZE
from distload.errors import CheckpointError
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

DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself applies
MAX_INDEX_BYTES = 64 * 1024 * 1024
MAX_DIMS = 64  # more than any real tensor (torch allows 64 dims at most)
MAX_ELEMENTS = 2**62  # product of a shape's non-zero dims: strides stay within int64


# --------------------------------------------------------------------------------------------
# headers


def read_header(
    path: Path, *, display: str | None = None, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> tuple[FileMeta, dict[str, TensorMeta], dict[str, str]]:
    """Read and validate the header of one safetensors file (header bytes only).

    Returns the file record, the tensors it holds, and its ``__metadata__``.
    """
    name = display or path.name
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fd = fh.fileno()
            return parse_header(
                name, size, lambda off, n: os.pread(fd, n, off), max_header_bytes=max_header_bytes
            )
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read: {exc}", file=name) from exc


def parse_header(
    name: str,
    size: int,
    read: Callable[[int, int], bytes],
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> tuple[FileMeta, dict[str, TensorMeta], dict[str, str]]:
    """Validate the header of a ``size``-byte safetensors file whose bytes ``read(offset, n)``
    returns (a local file, or range requests to a remote one). Reads header bytes only."""
    if size < 8:
        raise CheckpointError(
            f"{name}: file is {size} bytes, too small for a safetensors header "
            "(8-byte length prefix expected)",
            file=name,
        )
    prefix = read(0, 8)
    if len(prefix) != 8:
        raise CheckpointError(f"{name}: short read of the header length", file=name)
    length = int.from_bytes(prefix, "little")
    if length > max_header_bytes:
        raise CheckpointError(
            f"{name}: header length {length} exceeds the limit of {max_header_bytes} "
            "bytes (corrupted file or not safetensors)",
            file=name,
        )
    if 8 + length > size:
        raise CheckpointError(
            f"{name}: header length {length} runs past the end of the {size}-byte file "
            "(truncated or corrupted)",
            file=name,
        )
    raw = read(8, length)
    if len(raw) != length:
        raise CheckpointError(
            f"{name}: short read of the header ({len(raw)} of {length} bytes)", file=name
        )
    header = _decode_header(raw, name)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CheckpointError(f"{name}: __metadata__ must map strings to strings", file=name)
    data_start = 8 + length
    tensors = {t: _tensor_entry(t, entry, name, data_start) for t, entry in header.items()}
    _check_coverage(tensors, name, size - data_start, data_start)
    digest = hashlib.sha256(prefix + raw).hexdigest()
    return FileMeta(name, size, data_start, digest), tensors, meta


def _decode_header(raw: bytes, name: str) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{name}: duplicate key {key!r} in header", file=name)
            out[key] = value
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except CheckpointError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{name}: header is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})",
            file=name,
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{name}: header must be a JSON object, got {type(header).__name__}", file=name
        )
    return header


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(tensor: str, entry: object, name: str, data_start: int) -> TensorMeta:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{name}: tensor {tensor!r}: {what}", file=name, tensor=tensor)

    if not isinstance(entry, dict):
        raise bad(f"entry must be an object, got {type(entry).__name__}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise bad(f"unknown dtype {dtype!r}; valid: {sorted(ITEMSIZE)}"[:400])
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r}"[:300])
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    expected = math.prod(shape) * ITEMSIZE[dtype]
    begin, end = offsets
    if end - begin != expected:
        raise bad(
            f"data_offsets span {end - begin} bytes but dtype {dtype} x shape {shape} needs "
            f"{expected} bytes"
        )
    # every dim and the product of the non-zero ones must index memory (torch's int64
    # sizes and strides); safetensors refuses dims that do not fit an unsigned 64-bit
    # integer, torch.empty fails past 2**63
    if len(shape) > MAX_DIMS or math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise bad(
            f"shape {shape!r} is out of bounds (at most {MAX_DIMS} dims, and at most "
            f"2**62 elements counting only the non-zero dims)"[:300]
        )
    return TensorMeta(tensor, name, dtype, tuple(shape), data_start + begin, expected)


def _check_coverage(
    tensors: dict[str, TensorMeta], name: str, data_size: int, data_start: int
) -> None:
    cursor = 0
    for meta in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        begin, end = meta.offset - data_start, meta.offset - data_start + meta.nbytes
        if end > data_size:
            raise CheckpointError(
                f"{name}: tensor {meta.name!r} ends at data byte {end} but the file holds only "
                f"{data_size} data bytes (truncated file?)",
                file=name,
                tensor=meta.name,
            )
        if meta.nbytes == 0:
            continue
        if begin < cursor:
            raise CheckpointError(
                f"{name}: tensor {meta.name!r} at data bytes [{begin}, {end}) overlaps the "
                f"previous tensor ending at {cursor}",
                file=name,
                tensor=meta.name,
            )
        if begin > cursor:
            raise CheckpointError(
                f"{name}: gap of {begin - cursor} bytes before tensor {meta.name!r} "
                f"(data bytes [{cursor}, {begin}) belong to no tensor)",
                file=name,
                tensor=meta.name,
            )
        cursor = end
    if cursor != data_size:
        raise CheckpointError(
            f"{name}: {data_size - cursor} trailing data bytes after the last tensor "
            f"(header covers {cursor} of {data_size})",
            file=name,
        )


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
        if not _is_int(total):
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
) -> CheckpointIndex:
    """Resolve ``source``, read and validate its index and headers (coordinator only).

    ``allow_pickle=True`` also accepts PyTorch zip checkpoints (``.bin``/``.pt``), described
    with the weights-only unpickler and never executed (see ``distload.pickled``).
    """
    src = (
        source if isinstance(source, Source) else resolve_source(source, allow_pickle=allow_pickle)
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
