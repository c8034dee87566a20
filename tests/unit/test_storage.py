"""Positioned reads of byte ranges, views of tensors as bytes, and the staging arenas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distload.errors import CheckpointError
from distload.storage import Arenas, FileReader, ReadRequest, byte_view


def test_requests_fill_their_buffers_exactly(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096 + 17)
    (tmp_path / "a.bin").write_bytes(data)
    bufs = [bytearray(n) for n in (100, 5000, 3, 4096)]
    offsets = [0, 100, 5100, 7000]
    with FileReader(tmp_path, threads=2, block_bytes=4096) as reader:
        reader.read(
            [
                ReadRequest("a.bin", o, memoryview(b), f"t{i}")
                for i, (o, b) in enumerate(zip(offsets, bufs))
            ]
        )
        assert reader.bytes_read == sum(len(b) for b in bufs)
    for o, b in zip(offsets, bufs, strict=True):
        assert bytes(b) == data[o : o + len(b)]


def test_a_read_past_the_end_names_the_file_and_tensor(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    with FileReader(tmp_path) as reader, pytest.raises(CheckpointError, match=r"a\.bin.*'w'"):
        reader.read([ReadRequest("a.bin", 4, memoryview(bytearray(20)), "w")])


def test_file_names_cannot_escape_the_root(tmp_path: Path) -> None:
    (tmp_path / "inside").mkdir()
    (tmp_path / "secret").write_bytes(b"s")
    with FileReader(tmp_path / "inside") as reader, pytest.raises(CheckpointError):
        reader.read([ReadRequest("../secret", 0, memoryview(bytearray(1)), "w")])


def test_byte_view_is_the_tensor_memory() -> None:
    t = torch.zeros(3, 2, dtype=torch.float32)
    view = byte_view(t)
    assert len(view) == 24
    view[:4] = torch.tensor([1.5]).numpy().tobytes()
    assert t[0, 0].item() == 1.5
    with pytest.raises(ValueError):
        byte_view(t.t())  # not contiguous


def test_arenas_grow_to_the_largest_request_and_are_reused() -> None:
    arenas = Arenas(torch.device("cpu"))
    a = arenas.get("read0", 100)
    b = arenas.get("read0", 50)
    assert b.data_ptr() == a.data_ptr() and arenas.nbytes == 100
    arenas.get("read0", 200)
    arenas.get("recv", 10)
    assert arenas.nbytes == 210
    arenas.clear()
    assert arenas.nbytes == 0
