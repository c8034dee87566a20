"""Ranks that pass different arguments fail on every rank, naming the argument and the
ranks; ``out=`` naming each rank's own tensors is the one per-rank difference allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.distributed.cases import LLAMA_RULES
from tests.distributed.launch import check_all_ok, run_group
from tests.distributed.matrix_table import record_case

pytestmark = pytest.mark.timeout(120)
WORLD = 3


def _disagree(ckpt: Path, per_rank: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    cfg = {"source": str(ckpt), "rules": LLAMA_RULES, "timeout": 30}
    args = {"cfg": cfg, "per_rank": per_rank}
    return check_all_ok(run_group(WORLD, "disagreeing_load", args, timeout=90))


@pytest.mark.parametrize(
    ("per_rank", "argument", "ranks"),
    [
        ({"2": {"dtype": "float32"}}, "dtype", [2]),
        ({"1": {"rules": LLAMA_RULES[:3]}, "2": {"rules": []}}, "placement", [1, 2]),
        ({"1": {"shm": False}}, "shm", [1]),
    ],
    ids=["dtype", "placement", "shm"],
)
def test_a_rank_with_other_arguments_fails_every_rank(
    llama_ckpt: Path, per_rank: dict[str, Any], argument: str, ranks: list[int]
) -> None:
    errors = _disagree(llama_ckpt, per_rank)
    record_case(f"ranks {ranks} pass another {argument}", errors, victim=None)
    assert len({e["message"] for e in errors}) == 1  # the same error on every rank
    for err in errors:
        assert err["type"] == "DistLoadError" and err["phase"] == "plan", err
        assert f"disagree on the argument {argument!r}" in err["message"], err
        assert err["ranks"] == ranks, err
        assert err["seconds"] < 20, err


def test_a_rank_with_another_source_fails_every_rank(llama_ckpt: Path, mixed_ckpt: Path) -> None:
    errors = _disagree(llama_ckpt, {"1": {"source": str(mixed_ckpt), "rules": LLAMA_RULES}})
    for err in errors:
        assert "disagree on the argument 'source'" in err["message"] and err["ranks"] == [1]
        assert str(llama_ckpt) in err["message"] and str(mixed_ckpt) in err["message"]


def test_out_on_some_ranks_only_fails_every_rank(llama_ckpt: Path) -> None:
    errors = _disagree(llama_ckpt, {"0": {"out": True}})
    for err in errors:
        assert "ranks [0] pass out= but ranks [1, 2] do not" in err["message"], err


def test_each_stage_passes_out_for_its_own_tensors(llama_ckpt: Path) -> None:
    results = check_all_ok(run_group(WORLD, "stage_out_load", {"source": str(llama_ckpt)}))
    assert all(r["mine"] > 0 for r in results)
    assert sum(r["mine"] for r in results) >= results[0]["planned"]  # the union was planned


def test_byte_collectives_carry_every_payload_size() -> None:
    """The collectives agreements and plans travel by: one round up to the inline size, two
    beyond it, exact at the boundary, with ranks sending different sizes."""
    for result in check_all_ok(run_group(3, "transport_bytes", {}, timeout=90)):
        assert all(result["gathered"]) and all(result["broadcast"]), result
