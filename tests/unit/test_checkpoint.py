"""Index and header parsing, and every validation error, on hand-made files."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from distload.checkpoint import (
    CheckpointIndex,
    read_checkpoint,
    read_header,
    resolve_source,
)
from distload.errors import CheckpointError


def raw_file(path: Path, header: Any, data: bytes = b"", *, length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_reads_header_of_real_file(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.ones(2, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    fmeta, metas, meta = read_header(tmp_path / "x.safetensors")
    assert meta == {"format": "pt"}
    assert metas["a"].dtype == "BF16" and metas["a"].shape == (3, 5) and metas["a"].nbytes == 30
    assert metas["b"].nbytes == 16
    assert fmeta.size == (tmp_path / "x.safetensors").stat().st_size
    # offsets are absolute and the data there is the tensor's
    raw = (tmp_path / "x.safetensors").read_bytes()
    got = raw[metas["b"].offset : metas["b"].offset + 16]
    assert got == tensors["b"].numpy().tobytes()


GOOD_DATA = bytes(range(24))


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (b"", b"", None, "not valid JSON"),
        (b"\xff\xfe", b"", None, "not valid JSON"),
        (b"[1, 2]", b"", None, "must be a JSON object"),
        (b'{"a": 1, "a": 2}', b"", None, "duplicate key 'a'"),
        (b"[" * 100_000 + b"]" * 100_000, b"", None, "not valid JSON"),
        ({"a": entry("F32", [2], 0, 8)}, b"", 10**9, "exceeds the limit"),
        ({"a": entry("F32", [2], 0, 8)}, b"", 5000, "runs past the end"),
        ({"a": 5}, b"", None, "entry must be an object"),
        ({"a": entry("Q4", [2], 0, 8)}, b"\0" * 8, None, "unknown dtype 'Q4'"),
        ({"a": entry("F32", [-2], 0, 8)}, b"\0" * 8, None, "non-negative integers"),
        ({"a": entry("F32", [2.0], 0, 8)}, b"\0" * 8, None, "non-negative integers"),  # type: ignore[list-item]
        ({"a": entry("F32", [True], 0, 4)}, b"\0" * 4, None, "non-negative integers"),  # type: ignore[list-item]
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, b"", None, "data_offsets"),
        ({"a": entry("F32", [2], 8, 0)}, b"", None, "begin <= end"),
        ({"a": entry("F32", [3], 0, 8)}, b"\0" * 8, None, "needs 12 bytes"),
        ({"a": entry("F32", [2**40, 2**40], 0, 8)}, b"\0" * 8, None, "needs"),
        ({"a": entry("F32", [2], 0, 8)}, b"\0" * 4, None, "truncated"),
        (
            {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)},
            b"\0" * 12,
            None,
            "overlaps",
        ),
        (
            {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)},
            b"\0" * 20,
            None,
            "gap of 4 bytes",
        ),
        ({"a": entry("F32", [2], 0, 8)}, b"\0" * 12, None, "4 trailing data bytes"),
        ({"__metadata__": {"k": 1}, "a": entry("F32", [2], 0, 8)}, b"\0" * 8, None, "__metadata__"),
    ],
)
def test_header_validation_errors(
    tmp_path: Path, header: Any, data: bytes, length: int | None, message: str
) -> None:
    path = raw_file(tmp_path / "bad.safetensors", header, data, length=length)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors") as info:
        read_header(path)
    assert message in str(info.value)
    assert info.value.file == "bad.safetensors"


def test_too_small_file(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too small"):
        read_header(tmp_path / "x.safetensors")


def test_tensor_named_in_errors(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "x.safetensors", {"w": entry("BF16", [3], 0, 4)}, b"\0" * 4)
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    assert info.value.tensor == "w"


def test_zero_size_tensors_may_share_offsets(tmp_path: Path) -> None:
    header = {
        "e1": entry("F32", [0], 0, 0),
        "e2": entry("F32", [0, 3], 0, 0),
        "a": entry("U8", [4], 0, 4),
    }
    _, metas, _ = read_header(raw_file(tmp_path / "x.safetensors", header, b"\1\2\3\4"))
    assert metas["e2"].nbytes == 0 and metas["a"].nbytes == 4


def _sharded(tmp_path: Path) -> Path:
    save_file({"a": torch.arange(6, dtype=torch.float32)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.arange(4, dtype=torch.int32)}, str(tmp_path / "s2.safetensors"))
    index = {
        "metadata": {"total_size": 40},
        "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path


def _edit_index(folder: Path, fn: Any) -> None:
    path = folder / "model.safetensors.index.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_reads_sharded_checkpoint(tmp_path: Path) -> None:
    index = read_checkpoint(_sharded(tmp_path))
    assert [t.name for t in index.tensors] == ["a", "b"]
    assert index.total_bytes == 40
    assert CheckpointIndex.from_json(json.loads(json.dumps(index.to_json()))) == index


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["weight_map"].update(c="s1.safetensors"), "no such tensor"),
        (lambda d: d["weight_map"].update(a="missing.safetensors"), "missing"),
        (lambda d: d["weight_map"].update(a="../s1.safetensors"), "escapes"),
        (lambda d: d["weight_map"].update(a="/etc/passwd"), "escapes"),
        (lambda d: d["weight_map"].update(a=7), "must be a file name"),
        (lambda d: d["metadata"].update(total_size=41), "total_size is 41"),
        (lambda d: d["metadata"].update(total_size="x"), "must be an integer"),
        (lambda d: d.pop("weight_map"), "weight_map"),
    ],
)
def test_index_validation_errors(tmp_path: Path, edit: Any, message: str) -> None:
    folder = _sharded(tmp_path)
    _edit_index(folder, edit)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(folder)
    assert message in str(info.value)


def test_index_not_json(tmp_path: Path) -> None:
    folder = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_text("{nope")
    with pytest.raises(CheckpointError, match="cannot parse index"):
        read_checkpoint(folder)


def test_symlink_escape_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"a": torch.zeros(2)}, str(outside / "evil.safetensors"))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.symlink(outside / "evil.safetensors", folder / "s1.safetensors")
    index = {"weight_map": {"a": "s1.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="symlink escape"):
        read_checkpoint(folder)


def test_sources(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    assert resolve_source(tmp_path).single_file == "model.safetensors"
    assert resolve_source(tmp_path / "model.safetensors").single_file == "model.safetensors"
    assert read_checkpoint(tmp_path / "model.safetensors").tensors[0].name == "a"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"pytorch_model.bin": b"x"}, "pickle-based"),
        ({"notes.txt": b"x"}, "no model.safetensors.index.json"),
    ],
)
def test_source_errors(tmp_path: Path, files: dict[str, bytes], message: str) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(CheckpointError, match=message):
        resolve_source(tmp_path)


def test_missing_source_mentions_hub() -> None:
    with pytest.raises(CheckpointError, match="Hub repo id"):
        resolve_source("meta-llama/Llama-3-8B")


def test_pickle_file_refused(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="arbitrary code"):
        resolve_source(tmp_path / "model.pt")
