"""The benchmark's memory figure counts the shared-memory staging a rank created, also after
the files were unlinked (distload unlinks them as soon as every rank has mapped them)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from distload.bench.worker import own_shared_bytes


def _mapped(path: Path, size: int) -> mmap.mmap:
    with open(path, "w+b") as fh:
        fh.truncate(size)
        view = mmap.mmap(fh.fileno(), size)
    view[:] = b"\x01" * size  # touch every page: resident
    return view


def test_own_slots_count_after_unlink_and_peers_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTLOAD_SHM_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    size = 4 * 2**20
    assert own_shared_bytes() == 0
    own = tmp_path / "distload-abc-3-shm0"
    peer = tmp_path / "distload-abc-13-shm0"  # another rank whose number ends in 3
    views = [_mapped(own, size), _mapped(peer, size)]
    os.unlink(own)
    os.unlink(peer)
    try:
        assert own_shared_bytes() == size
    finally:
        for v in views:
            v.close()
    assert own_shared_bytes() == 0
