"""Which files count as page cached: each node's report, rank 0's intersection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distload.residency import (
    cached_range,
    choose_cached,
    evict,
    in_page_cache,
    node_leaders,
    node_report,
    resident_files,
    resident_fraction,
)


def _write(path: Path, size: int) -> None:
    path.write_bytes(os.urandom(size))
    path.read_bytes()  # in the page cache now


def test_a_file_counts_only_when_every_node_holds_it() -> None:
    used = ["a.safetensors", "b.safetensors", "c.safetensors"]
    reports = [["a.safetensors", "b.safetensors"], ["b.safetensors", "c.safetensors"]]
    assert choose_cached(used, reports) == ["b.safetensors"]
    assert choose_cached(used, [used, used]) == used
    # a file no node holds, a node that could not tell, no report at all: nothing cached
    assert choose_cached(["d.safetensors"], reports) == []
    assert choose_cached(used, [used, None]) == []
    assert choose_cached(used, []) == []


def test_node_leaders_are_the_first_rank_of_each_node() -> None:
    assert node_leaders([0, 0, 1, 1]) == {0: 0, 1: 2}
    assert node_leaders([0, 1, 0, 1]) == {0: 0, 1: 1}
    assert node_leaders([]) == {}


def test_resident_files_lists_the_cached_safetensors_of_a_folder(tmp_path: Path) -> None:
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("preadv2(RWF_NOWAIT) unavailable: residency cannot be told here")
    _write(tmp_path / "model-1.safetensors", 64 * 1024)
    _write(tmp_path / "model-2.safetensors", 64 * 1024)
    _write(tmp_path / "notes.txt", 100)
    assert in_page_cache(tmp_path / "model-1.safetensors")
    found = resident_files(tmp_path)
    assert found == ["model-1.safetensors", "model-2.safetensors"]
    # a file of the folder names the same folder
    assert resident_files(tmp_path / "model-2.safetensors") == found


def test_a_mostly_resident_file_counts_as_cached(tmp_path: Path) -> None:
    """A warm file with a few pages reclaimed takes the page-cache path (it faults those
    pages in); one with much of it evicted reads as cold."""
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("preadv2(RWF_NOWAIT) unavailable: residency cannot be told here")
    path = tmp_path / "model.safetensors"
    size = 8 * 1024 * 1024
    _write(path, size)
    assert resident_fraction(path) == 1.0
    evict(path, 0, size)
    if resident_fraction(path) != 0.0:
        pytest.skip("this filesystem keeps its pages (tmpfs?): nothing can be evicted")
    path.read_bytes()
    evict(path, size // 2, size // 50)  # 2% gone
    assert 0.9 < resident_fraction(path) < 1.0  # type: ignore[operator]
    assert in_page_cache(path)
    evict(path, 0, size // 2)  # half gone
    assert resident_fraction(path) <= 0.5  # type: ignore[operator]
    assert not in_page_cache(path)
    assert in_page_cache(path, enough=0.4)
    assert resident_fraction(tmp_path / "missing") is None


def test_resident_files_of_something_not_local_is_unknown(tmp_path: Path) -> None:
    assert resident_files("org/model-that-is-not-here") is None
    assert resident_files(tmp_path / "missing") is None
    assert not in_page_cache(tmp_path / "missing.safetensors")


def test_only_node_leaders_of_a_multi_node_job_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("preadv2(RWF_NOWAIT) unavailable: residency cannot be told here")
    _write(tmp_path / "model.safetensors", 8192)
    nodes = [0, 0, 1, 1]
    assert node_report(tmp_path, 0, nodes) == ["model.safetensors"]
    assert node_report(tmp_path, 2, nodes) == ["model.safetensors"]
    assert node_report(tmp_path, 1, nodes) is None  # not its node's first rank
    assert node_report(tmp_path, 0, [0, 0]) is None  # one node: rank 0 probes when planning
    monkeypatch.setenv("DISTLOAD_PAGE_CACHE", "0")
    assert node_report(tmp_path, 0, nodes) is None


def test_cached_range_tells_block_by_block(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    mib = 1024 * 1024
    _write(path, 8 * mib)
    fd = os.open(path, os.O_RDONLY)
    try:
        if cached_range(fd, 0, 4096) is None:
            pytest.skip("cachestat(2) unavailable here (Linux before 6.5)")
        assert cached_range(fd, 0, 8 * mib) is True
        # the second half (aligned: the cache may hold the file in folios of up to 2 MiB)
        evict(path, 4 * mib, 4 * mib)
        if cached_range(fd, 4 * mib, 4096):
            pytest.skip("this filesystem keeps its pages (tmpfs?): nothing can be evicted")
        assert cached_range(fd, 0, 4 * mib) is True  # the first half is whole
        assert cached_range(fd, 1000, 4 * mib) is False  # ends inside the dropped half
        assert cached_range(fd, 4 * mib - 1, 2) is False  # straddles the edge
        assert cached_range(fd, 6 * mib, 4096) is False
        assert cached_range(fd, 5, 0) is True  # nothing asked: nothing missing
    finally:
        os.close(fd)


def test_a_large_file_is_probed_in_windows_spread_over_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond SAMPLED_FROM bytes the probe asks cachestat about WINDOWS windows spread over
    the file, a cost per file rather than per byte, and their fraction stands for the
    file's."""
    from distload import residency

    path = tmp_path / "model.safetensors"
    mib = 1024 * 1024
    _write(path, 8 * mib)
    fd = os.open(path, os.O_RDONLY)
    try:
        if residency.cached_pages(fd, 0, 4096) is None:
            pytest.skip("cachestat(2) unavailable here (Linux before 6.5)")
    finally:
        os.close(fd)
    monkeypatch.setattr(residency, "SAMPLED_FROM", mib)
    monkeypatch.setattr(residency, "WINDOWS", 8)
    monkeypatch.setattr(residency, "WINDOW", 64 * 1024)
    asked: list[tuple[int, int]] = []
    real = residency.cached_pages

    def counted(fd: int, offset: int, length: int) -> int | None:
        asked.append((offset, length))
        return real(fd, offset, length)

    monkeypatch.setattr(residency, "cached_pages", counted)
    assert resident_fraction(path) == 1.0
    assert len(asked) == 8 and all(n == 64 * 1024 for _, n in asked)
    assert asked[0][0] == 0 and asked[-1][0] + asked[-1][1] > 7 * mib  # spread to the end
    evict(path, 4 * mib, 4 * mib)  # the second half gone
    if resident_fraction(path) == 1.0:
        pytest.skip("this filesystem keeps its pages (tmpfs?): nothing can be evicted")
    assert resident_fraction(path) == 0.5
    evict(path)
    assert resident_fraction(path) == 0.0
