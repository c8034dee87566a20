"""Gather reads (``distload.execute.gather``): run layouts of regions, and reads that fill
exactly the destination region, checked against the bytes of the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distload.errors import CheckpointError
from distload.execute import gather as g


def _file(tmp_path: Path, nbytes: int) -> tuple[Path, torch.Tensor]:
    data = torch.randint(
        0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    path = tmp_path / "blob.bin"
    path.write_bytes(data.numpy().tobytes())
    return path, data


def _read(path: Path, runs: g.Runs) -> g.GatherStats:
    import os

    stats = g.GatherStats()
    fd = os.open(path, os.O_RDONLY)
    try:
        g.gather(fd, runs, stats, file=path.name, tensor="t")
    finally:
        os.close(fd)
    return stats


@pytest.mark.parametrize(
    ("shape", "box"),
    [
        ((64, 96), ((8, 40), (0, 96))),  # whole rows: one run
        ((64, 4096), ((0, 64), (0, 3584))),  # a wide column block: runs joined, small gaps
        ((64, 4096), ((0, 64), (1024, 2048))),  # a quarter of the columns: long gaps
        ((6, 8, 3000), ((1, 5), (1, 8), (0, 3000))),  # 3-d: blocks of rows, small gaps
        ((6, 8, 64), ((0, 6), (0, 8), (0, 64))),  # the whole tensor
    ],
)
def test_gather_fills_exactly_the_region(
    tmp_path: Path, shape: tuple[int, ...], box: tuple
) -> None:
    offset = 136  # the piece starts mid-page, as a tensor in a safetensors file does
    numel = int(np.prod(shape))
    path, data = _file(tmp_path, offset + numel * 2 + 100)
    stored = data[offset : offset + numel * 2].view(torch.bfloat16).view(shape)
    sl = tuple(slice(a, b) for a, b in box)
    piece = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    dest_full = torch.full((shape[0] + 2, *shape[1:]), 7, dtype=torch.bfloat16)
    dest = dest_full[1 : 1 + (box[0][1] - box[0][0])][(slice(None), *sl[1:])]
    if not dest.is_contiguous() and dest.stride()[-1] != 1:
        pytest.skip("not a layout destinations have")
    before = dest_full.clone()
    runs = g.runs_of(offset, piece[sl], dest)
    if runs is None:  # a quarter of the columns: left to the mapping (long gaps)
        assert box == ((0, 64), (1024, 2048))
        return
    stats = _read(path, runs)
    assert torch.equal(dest.view(torch.int16), stored[sl].reshape(dest.shape).view(torch.int16))
    # nothing outside the region was written
    mask = torch.ones(dest_full.shape, dtype=torch.bool)
    mask[1 : 1 + (box[0][1] - box[0][0])][(slice(None), *sl[1:])] = False
    assert torch.equal(dest_full[mask].view(torch.int16), before[mask].view(torch.int16))
    assert stats.delivered == dest.numel() * 2
    assert stats.gap <= g.MAX_GAP_SHARE * stats.delivered


def test_runs_of_a_whole_rows_region_is_one_run() -> None:
    piece = torch.empty((10, 32), dtype=torch.float32, device="meta")
    dest = torch.zeros((4, 32))
    runs = g.runs_of(1000, piece[3:7], dest)
    assert runs is not None
    assert runs.offsets.tolist() == [1000 + 3 * 32 * 4]
    assert runs.addrs.tolist() == [dest.data_ptr()] and runs.lengths.tolist() == [4 * 32 * 4]


def test_runs_of_refuses_what_it_cannot_take() -> None:
    piece = torch.empty((10, 32), dtype=torch.float32, device="meta")
    assert g.runs_of(0, piece, torch.zeros((10, 32), dtype=torch.float64)) is None  # a cast
    assert g.runs_of(0, piece[:, :16], torch.zeros((10, 8))) is None  # a shape mismatch
    # a column block far narrower than its rows: the gaps would cost more than they save
    wide = torch.empty((10, 8192), dtype=torch.float32, device="meta")
    assert g.runs_of(0, wide[:, :1024], torch.zeros((10, 1024))) is None


def test_column_blocks_with_small_gaps_join_into_one_call(tmp_path: Path) -> None:
    shape = (200, 2048)
    path, data = _file(tmp_path, 200 * 2048 * 4)
    piece = torch.empty(shape, dtype=torch.float32, device="meta")
    dest = torch.zeros((200, 1792))
    runs = g.runs_of(0, piece[:, 256:], dest)
    assert runs is not None and len(runs.offsets) == 200
    stats = _read(path, runs)
    assert stats.calls == 1  # 200 runs and their gaps: one preadv
    assert stats.gap == 199 * 256 * 4
    assert torch.equal(dest.view(torch.int32), data.view(torch.int32).view(shape)[:, 256:])


def test_a_truncated_file_names_the_file_and_the_tensor(tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 1000)
    piece = torch.empty((100, 10), dtype=torch.float32, device="meta")
    runs = g.runs_of(0, piece, torch.zeros((100, 10)))
    assert runs is not None
    with pytest.raises(CheckpointError, match=r"blob.bin: unexpected end of file.*'t'"):
        _read(path, runs)


def test_short_reads_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A preadv that returns fewer bytes than asked (allowed by POSIX) is resumed where it
    stopped, inside a buffer or at a buffer's end."""
    shape = (50, 1024)
    path, data = _file(tmp_path, 50 * 1024 * 4)
    real = g._preadv
    assert real is not None

    def short(fd: int, iov: int, count: int, offset: int) -> int:
        first = np.ctypeslib.as_array((g.ctypes.c_uint64 * 2).from_address(iov))
        return real(fd, iov, 1, offset) if first[1] > 1000 else real(fd, iov, count, offset)

    monkeypatch.setattr(g, "_preadv", short)
    piece = torch.empty(shape, dtype=torch.float32, device="meta")
    dest = torch.zeros((50, 960))
    runs = g.runs_of(0, piece[:, 64:], dest)
    assert runs is not None
    _read(path, runs)
    assert torch.equal(dest.view(torch.int32), data.view(torch.int32).view(shape)[:, 64:])


def test_whole_tensors_back_to_back_are_one_call_and_errors_name_the_tensor(
    tmp_path: Path,
) -> None:
    path, data = _file(tmp_path, 3000)
    dests = [torch.zeros(100, dtype=torch.uint8) for _ in range(20)]
    runs = g.Runs.of_tensors([(64 + 100 * i, d, f"t{i}") for i, d in enumerate(dests)][::-1])
    stats = _read(path, runs)
    assert stats.calls == 1 and stats.gap == 0 and stats.delivered == 2000
    for i, d in enumerate(dests):
        assert torch.equal(d, data[64 + 100 * i : 164 + 100 * i])
    beyond = g.Runs.of_tensors([(2900, dests[0], "a"), (3000 - 50, dests[1], "past_the_end")])
    with pytest.raises(ValueError, match="overlapping"):
        _read(path, beyond)  # 2900 + 100 runs into 2950
    beyond = g.Runs.of_tensors([(2800, dests[0], "a"), (2950, dests[1], "past_the_end")])
    with pytest.raises(CheckpointError, match="'past_the_end'") as err:
        _read(path, beyond)
    assert err.value.tensor == "past_the_end" and err.value.file == "blob.bin"


@pytest.mark.parametrize(
    ("shape", "box"),
    [
        ((64, 96), ((8, 40), (0, 96))),
        ((64, 4096), ((0, 64), (0, 3584))),
        ((64, 4096), ((0, 64), (1024, 2048))),
        ((2048, 5632), ((0, 2048), (1408, 2816))),  # a down_proj column block of TP 4
        ((6, 8, 3000), ((1, 5), (1, 8), (0, 3000))),
        ((1, 8192), ((0, 1), (0, 1024))),  # one row: one run
        ((5,), ((1, 4),)),
        ((), ()),
    ],
)
def test_worth_gathering_agrees_with_runs_of(shape: tuple[int, ...], box: tuple) -> None:
    piece = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    region = piece[tuple(slice(a, b) for a, b in box)] if box else piece
    dest = torch.zeros(region.shape, dtype=torch.bfloat16)
    assert g.worth_gathering(shape, box, 2) == (g.runs_of(0, region, dest) is not None)
