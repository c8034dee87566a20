"""Safetensors headers: read the 8-byte length and the JSON header, validate every entry.

Runs on the coordinator (local files) and for Hub sources on ranges fetched by HTTP; never
reads tensor data. Every check raises a :class:`~distload.errors.CheckpointError` naming the
file and tensor (see ``distload.checkpoint`` for the list).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distload.dtypes import ITEMSIZE
from distload.errors import CheckpointError
from distload.index import FileMeta, TensorMeta

DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself applies
MAX_DIMS = 64  # more than any real tensor (torch allows 64 dims at most)
MAX_ELEMENTS = 2**62  # product of a shape's non-zero dims: strides stay within int64


def read_header(
    path: Path, *, display: str | None = None, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> tuple[FileMeta, dict[str, TensorMeta], dict[str, str]]:
    """Read and validate the header of one safetensors file (header bytes only: no kernel
    read-ahead into the tensors' bytes, which a reader may fetch with O_DIRECT).

    Returns the file record, the tensors it holds, and its ``__metadata__``.
    """
    name = display or path.name
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fd = fh.fileno()
            if hasattr(os, "posix_fadvise"):
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
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


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(tensor: str, entry: object, name: str, data_start: int) -> TensorMeta:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{name}: tensor {tensor!r}: {what}", file=name, tensor=tensor)

    if not isinstance(entry, dict):
        raise bad(f"entry must be an object, got {type(entry).__name__}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise bad(f"unknown dtype {dtype!r}; valid: {sorted(ITEMSIZE)}"[:400])
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r}"[:300])
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(o) and o >= 0 for o in offsets)
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
