"""Faults beyond the failure matrix, each at world 3 (rows of docs/failure-matrix.md's second
table): a rank's callback raising, a shard rewritten between planning and reading."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.distributed.launch import check_all_ok, run_group
from tests.distributed.matrix_table import record_case

pytestmark = pytest.mark.timeout(120)
WORLD = 3


def test_a_raising_progress_callback_fails_every_rank(llama_ckpt: Path) -> None:
    got = check_all_ok(
        run_group(WORLD, "sabotaged_load", {"source": str(llama_ckpt), "kind": "raising_progress"})
    )
    record_case("progress callback raises on rank 0", got, victim=0)
    assert len({e["message"] for e in got}) == 1
    for err in got:
        assert err["ranks"] == [0] and "progress callback broke" in err["message"], err
        assert err["seconds"] < 15, err  # never the 30 s timeout


def test_a_shard_rewritten_after_planning_fails_every_rank(
    llama_ckpt: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(llama_ckpt, folder)
    shard = sorted(folder.glob("*.safetensors"))[1].name
    args = {"source": str(folder), "kind": "rewrite_shard", "shard": shard}
    got = check_all_ok(run_group(WORLD, "sabotaged_load", args))
    record_case("shard rewritten after planning (longer header)", got, victim=None)
    for err in got:
        assert "replaced or rewritten" in err["message"] and shard in err["message"], err
        assert err["phase"] == "read", err
        assert err["seconds"] < 15, err
