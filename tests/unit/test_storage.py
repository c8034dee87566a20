"""Positioned reads of byte ranges, views of tensors as bytes, and the staging arenas."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from pathlib import Path

import pytest
import torch

from distload import directio, storage
from distload.arenas import Arenas
from distload.errors import CheckpointError
from distload.residency import cached_range, evict
from distload.storage import FileReader, ReadRequest, byte_view


@pytest.mark.parametrize("threads", [2, 0], ids=["pool", "inline"])
def test_requests_fill_their_buffers_exactly(tmp_path: Path, threads: int) -> None:
    data = os.urandom(3 * 4096 + 17)
    (tmp_path / "a.bin").write_bytes(data)
    bufs = [bytearray(n) for n in (100, 5000, 3, 4096)]
    offsets = [0, 100, 5100, 7000]
    with FileReader(tmp_path, threads=threads, block_bytes=4096) as reader:
        reader.read(
            [
                ReadRequest("a.bin", o, memoryview(b), f"t{i}")
                for i, (o, b) in enumerate(zip(offsets, bufs))
            ]
        )
        assert reader.bytes_read == sum(len(b) for b in bufs)
    for o, b in zip(offsets, bufs, strict=True):
        assert bytes(b) == data[o : o + len(b)]


@pytest.mark.parametrize("threads", [4, 0], ids=["pool", "inline"])
def test_a_read_past_the_end_names_the_file_and_tensor(tmp_path: Path, threads: int) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    with (
        FileReader(tmp_path, threads=threads) as reader,
        pytest.raises(CheckpointError, match=r"a\.bin.*'w'"),
    ):
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


# -- O_DIRECT reads ----------------------------------------------------------------------------


def _direct_or_skip(path: Path) -> None:
    """Skip where this filesystem refuses O_DIRECT or the kernel cannot tell what is cached."""
    if not hasattr(os, "O_DIRECT") or directio.open_direct(path) is None:
        pytest.skip(f"{path.parent} refuses O_DIRECT")
    fd = os.open(path, os.O_RDONLY)
    try:
        if cached_range(fd, 0, 1) is None:
            pytest.skip("cachestat is not available: blocks cannot be told cached")
    finally:
        os.close(fd)


def _cold_file(tmp_path: Path, size: int) -> bytes:
    data = os.urandom(size)
    (tmp_path / "a.bin").write_bytes(data)
    _direct_or_skip(tmp_path / "a.bin")
    evict(tmp_path / "a.bin")
    return data


def _requests(spans: list[tuple[int, int]]) -> tuple[list[ReadRequest], list[bytearray]]:
    bufs = [bytearray(n) for _, n in spans]
    reqs = [
        ReadRequest("a.bin", o, memoryview(b), f"t{i}")
        for i, ((o, _), b) in enumerate(zip(spans, bufs))
    ]
    return reqs, bufs


def test_cold_blocks_are_read_with_o_direct_bit_exact(tmp_path: Path) -> None:
    size = 5 * 2**20 + 4321  # not a multiple of the alignment: the last block ends short
    data = _cold_file(tmp_path, size)
    spans = [
        (0, 100),  # the file's head, unaligned length
        (100, 5000),  # back to back with the one before (one run of two buffers)
        (5100, 3),
        (7001, 3 * 2**20 + 77),  # unaligned both ends, longer than one direct block
        (size - 999, 999),  # the file's last bytes
    ]
    reqs, bufs = _requests(spans)
    with FileReader(tmp_path, threads=3) as reader:
        reader.read(reqs)
        total = sum(n for _, n in spans)
        assert reader.bytes_read == total
        assert reader.bytes_direct == total and reader.bytes_kernel_copied == 0
        assert (
            0 < reader.bounce_bytes <= 3 * (directio.DIRECT_BLOCK_BYTES + 2 * directio.DIRECT_ALIGN)
        )
    for (o, n), b in zip(spans, bufs, strict=True):
        assert bytes(b) == data[o : o + n]
    fd = os.open(tmp_path / "a.bin", os.O_RDONLY)
    try:  # O_DIRECT left nothing in the page cache
        assert cached_range(fd, 7001 + 4096, 2**20) is False
    finally:
        os.close(fd)


def test_cached_blocks_are_read_through_the_page_cache(tmp_path: Path) -> None:
    data = _cold_file(tmp_path, 3 * 2**20)
    with open(tmp_path / "a.bin", "rb") as fh:  # the first MiB is cached again
        fh.read(2**20)
    reqs, bufs = _requests([(0, 2**20), (2**20, 2 * 2**20)])
    with FileReader(tmp_path, threads=2) as reader:
        reader.read(reqs)
        assert reader.bytes_kernel_copied == 2**20  # the cached block
        assert reader.bytes_direct == 2 * 2**20  # the cold ones
    assert bytes(bufs[0]) + bytes(bufs[1]) == data


def test_direct_off_and_resident_files_read_buffered(tmp_path: Path) -> None:
    data = _cold_file(tmp_path, 2**20 + 5)
    for kwargs in ({"direct": False}, {"resident": ["a.bin"]}):
        evict(tmp_path / "a.bin")
        reqs, bufs = _requests([(3, 2**20)])
        with FileReader(tmp_path, **kwargs) as reader:  # type: ignore[arg-type]
            reader.read(reqs)
            assert reader.bytes_direct == 0 and reader.bytes_kernel_copied == 2**20
            assert reader.bounce_bytes == 0
        assert bytes(bufs[0]) == data[3 : 3 + 2**20]


def test_a_filesystem_refusing_o_direct_is_read_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _cold_file(tmp_path, 2**20)
    monkeypatch.setattr(storage, "open_direct", lambda path: None)  # EINVAL at open
    reqs, bufs = _requests([(10, 1000)])
    with FileReader(tmp_path) as reader:
        reader.read(reqs)
        assert reader.bytes_direct == 0
    assert bytes(bufs[0]) == data[10:1010]


def test_a_refused_direct_read_falls_back_for_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _cold_file(tmp_path, 2**20)
    real = os.preadv
    refused: list[int] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int, *flags: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")  # as a filesystem refusing it
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(storage.os, "preadv", preadv)
    reqs, bufs = _requests([(10, 1000), (2**19, 2**19)])
    with FileReader(tmp_path, threads=1) as reader:
        reader.read(reqs)
        assert reader.bytes_direct == 0 and reader.bytes_kernel_copied == 1000 + 2**19
        assert len(refused) == 1  # asked once: the file reads buffered from then on
    assert bytes(bufs[0]) == data[10:1010] and bytes(bufs[1]) == data[2**19 :]


def test_a_direct_read_past_the_end_names_the_file_and_tensor(tmp_path: Path) -> None:
    _cold_file(tmp_path, 10_000)
    with FileReader(tmp_path) as reader, pytest.raises(CheckpointError, match=r"a\.bin.*'w'"):
        reader.read([ReadRequest("a.bin", 9000, memoryview(bytearray(5000)), "w")])


def test_bounce_buffers_stay_within_their_budget(tmp_path: Path) -> None:
    assert directio.direct_block(None, 4) == directio.DIRECT_BLOCK_BYTES
    assert directio.direct_block(16 * 2**20, 4) == directio.DIRECT_BLOCK_BYTES
    block = directio.direct_block(2**20, 4)  # a quarter each, less the aligned edges
    assert block % directio.DIRECT_ALIGN == 0 and 4 * (block + 2 * directio.DIRECT_ALIGN) <= 2**20
    assert directio.direct_block(100_000, 4) == 0  # too tight: buffered reads
    data = _cold_file(tmp_path, 3 * 2**20 + 1)
    for budget, direct in ((2**20, True), (100_000, False)):
        evict(tmp_path / "a.bin")
        reqs, bufs = _requests([(1, 3 * 2**20)])
        with FileReader(tmp_path, threads=4, bounce_budget=budget) as reader:
            reader.read(reqs)
            assert reader.bounce_bytes <= budget
            assert reader.bytes_direct == (3 * 2**20 if direct else 0)
        assert bytes(bufs[0]) == data[1:]


def test_buffers_at_the_files_alignment_take_the_dma_straight(tmp_path: Path) -> None:
    """Buffers whose address is congruent to their file offset (a staging layout mirrors the
    file) are filled by the O_DIRECT read itself, but for their unaligned ends; others go
    through the bounce buffer."""
    size = 6 * 2**20 + 333
    data = _cold_file(tmp_path, size)
    arena = mmap.mmap(-1, 8 * 2**20)  # page aligned, as staging arenas and slots are
    memory = memoryview(arena)
    first, second, third = 3 * 2**20, 100_000, 50_000
    at = 5000  # the first piece's file offset, and its place in the arena (same residue)
    spans = [
        (at, at, first),  # (file offset, arena offset, length)
        (at + first, at + first, second),  # stored right after it, placed right after it
        (4 * 2**20 + 12345, 7 * 2**20 + 1, third),  # misaligned in memory: bounced
    ]
    reqs = [
        ReadRequest("a.bin", o, memory[m : m + n], f"t{i}") for i, (o, m, n) in enumerate(spans)
    ]
    with FileReader(tmp_path, threads=2) as reader:
        reader.read(reqs)
        assert reader.bytes_direct == first + second + third
        # at most one partial block at each end of each run, plus the misaligned piece
        runs = -(-(first + second) // directio.DIRECT_BLOCK_BYTES)
        assert third <= reader.bytes_bounced <= third + 2 * runs * directio.DIRECT_ALIGN
    del reqs
    for o, m, n in spans:
        assert memory[m : m + n] == data[o : o + n], (o, m, n)
    memory.release()
    arena.close()
