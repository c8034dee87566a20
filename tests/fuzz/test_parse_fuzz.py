"""Fuzzing the safetensors header and index parsers: every input ends in a CheckpointError
with a message (or parses), within bounded time and memory -- never another exception."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from distload.checkpoint import read_checkpoint, read_header
from distload.dtypes import ITEMSIZE
from distload.errors import CheckpointError

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
COUNTS: dict[str, int] = {}
pytestmark = pytest.mark.xdist_group("fuzz")  # one process, file order: see the last test


def _check(path: Path) -> None:
    try:
        _, metas, _ = read_header(path, max_header_bytes=1 << 20)
    except CheckpointError as exc:
        assert str(exc) and exc.file
        return
    size = path.stat().st_size
    for meta in metas.values():  # whatever parses is in bounds and self-consistent
        assert 0 <= meta.offset <= meta.offset + meta.nbytes <= size
        assert meta.nbytes == math.prod(meta.shape) * ITEMSIZE[meta.dtype]


def _write(tmp: Path, header: bytes, data: bytes, length: int | None = None) -> Path:
    path = tmp / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


@FUZZ
@given(raw=st.binary(max_size=512))
def test_random_bytes(tmp_path: Path, raw: bytes) -> None:
    COUNTS["random bytes"] = COUNTS.get("random bytes", 0) + 1
    path = tmp_path / "f.safetensors"
    path.write_bytes(raw)
    _check(path)


@FUZZ
@given(length=st.integers(0, 2**64 - 1), body=st.binary(max_size=64))
def test_declared_header_lengths(tmp_path: Path, length: int, body: bytes) -> None:
    COUNTS["declared header lengths"] = COUNTS.get("declared header lengths", 0) + 1
    _check(_write(tmp_path, body, b"", length=length))


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from([*ITEMSIZE, "Q4", "", "f32"]), json_value),
        "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_value),
        "data_offsets": st.one_of(st.lists(st.integers(-5, 2**40), max_size=3), json_value),
    },
)


@FUZZ
@given(
    header=st.dictionaries(st.text(max_size=10), st.one_of(entry, json_value), max_size=5),
    data=st.binary(max_size=256),
)
def test_structured_headers(tmp_path: Path, header: dict[str, Any], data: bytes) -> None:
    COUNTS["structured headers"] = COUNTS.get("structured headers", 0) + 1
    body = json.dumps(header, allow_nan=True).encode()
    _check(_write(tmp_path, body, data))


@pytest.fixture(scope="module")
def real_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = tmp_path_factory.mktemp("real")
    tensors = {
        "a": torch.ones(3, 5, dtype=torch.bfloat16),
        "b": torch.arange(7),
        "c": torch.zeros(2, 2, 2),
    }
    save_file(tensors, str(folder / "x.safetensors"))
    return (folder / "x.safetensors").read_bytes()


@FUZZ
@given(data=st.data())
def test_mutations_of_a_real_file(tmp_path: Path, real_file: bytes, data: st.DataObject) -> None:
    """Flip, insert, delete and truncate bytes of a real file, header included."""
    COUNTS["mutated real files"] = COUNTS.get("mutated real files", 0) + 1
    raw = bytearray(real_file)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "digit"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and raw:
            del raw[pos]
        elif op == "truncate":
            raw = raw[:pos]
        elif op == "digit":  # change a number inside the JSON header: offsets, shapes
            header_end = 8 + int.from_bytes(bytes(real_file[:8]), "little")
            digits = [i for i in range(8, header_end) if chr(real_file[i]).isdigit()]
            digits = [i for i in digits if i < len(raw)]
            if digits:
                raw[data.draw(st.sampled_from(digits))] = ord(str(data.draw(st.integers(0, 9))))
    path = tmp_path / "f.safetensors"
    path.write_bytes(bytes(raw))
    _check(path)


@FUZZ
@given(
    weight_map=st.dictionaries(
        st.text(max_size=6),
        st.one_of(
            st.sampled_from(
                [
                    "s.safetensors",
                    "../s.safetensors",
                    "/etc/passwd",
                    "",
                    ".",
                    "sub/../s.safetensors",
                    "missing.safetensors",
                    "s.safetensors\x00",
                ]
            ),
            json_value,
        ),
        max_size=4,
    ),
    total=st.one_of(st.none(), st.integers(-1, 100), json_value),
)
def test_indexes(tmp_path: Path, weight_map: dict[str, Any], total: Any) -> None:
    COUNTS["indexes"] = COUNTS.get("indexes", 0) + 1
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    save_file({"w": torch.zeros(2)}, str(folder / "s.safetensors"))
    index: dict[str, Any] = {"weight_map": weight_map}
    if total is not None:
        index["metadata"] = {"total_size": total}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, allow_nan=True))
    try:
        got = read_checkpoint(folder)
    except CheckpointError as exc:
        assert str(exc)
        return
    for meta in got.tensors:  # anything accepted stays inside the folder and its file
        assert meta.file == "s.safetensors"


def test_deep_json_is_refused_quickly(tmp_path: Path) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(_write(tmp_path, body, b""))


def test_fuzz_counts_are_reported() -> None:
    """Runs last in this module (one xdist group: same process, file order): every fuzz
    test above ran, each on at least a hundred generated cases; the numbers for the docs."""
    if not COUNTS:
        pytest.skip("the fuzz tests of this module did not run in this process (-k?)")
    expected = {
        "random bytes",
        "declared header lengths",
        "structured headers",
        "mutated real files",
        "indexes",
    }
    assert set(COUNTS) == expected, f"fuzz tests that did not run: {expected - set(COUNTS)}"
    for name, n in sorted(COUNTS.items()):
        print(f"fuzz: {name}: {n} cases")
        assert n >= 100, f"{name}: only {n} cases generated"
