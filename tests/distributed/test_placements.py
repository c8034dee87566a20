"""Pipeline stages, device maps and a dp x pp x tp mesh on real gloo groups, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.distributed.launch import check_all_ok, run_group
from tests.distributed.test_load import LLAMA_RULES
from tests.reference import read_all

pytestmark = pytest.mark.timeout(240)


def _covers(prefix: str, name: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _holders_by_stage(
    names: list[str], stage_ranks: list[list[int]], stages: list[list[str]]
) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name in names:
        ranks: list[int] = []
        for ranks_of_stage, prefixes in zip(stage_ranks, stages):
            if any(_covers(p, name) for p in prefixes):
                ranks.extend(ranks_of_stage)
        out[name] = sorted(ranks)
    return out


def _check_read_once(results: list[dict[str, Any]]) -> None:
    first = results[0]
    assert sum(first["bytes_read"]) == first["total_bytes"]


LLAMA_STAGES = [
    ["model.embed_tokens", "model.layers.0"],
    ["model.layers.1", "model.norm", "lm_head", "model.embed_tokens"],  # tied: embed in both
]


def test_explicit_pipeline_two_stages(llama_ckpt: Path) -> None:
    names = list(read_all(llama_ckpt))
    expect = _holders_by_stage(names, [[0], [1]], LLAMA_STAGES)
    args = {
        "source": str(llama_ckpt),
        "placement": {"kind": "pipeline", "stages": LLAMA_STAGES},
        "expect": expect,
    }
    results = check_all_ok(run_group(2, "load_placement", args))
    _check_read_once(results)
    assert "model.embed_tokens.weight" in results[0]["held"]
    assert "model.embed_tokens.weight" in results[1]["held"]
    assert not any(n.startswith("model.layers.1.") for n in results[0]["held"])


def test_auto_pipeline_three_stages(mixed_ckpt: Path) -> None:
    args = {"source": str(mixed_ckpt), "placement": {"kind": "pipeline", "num_stages": 3}}
    results = check_all_ok(run_group(3, "load_placement", args))
    _check_read_once(results)
    layer_of = [
        {n.split(".")[2] for n in r["held"] if n.startswith("model.layers.")} for r in results
    ]
    assert layer_of == [{"0"}, {"1"}, {"2"}]


def test_explicit_device_map_with_cpu(mixed_ckpt: Path) -> None:
    dm = {
        "": 0,
        "model.layers.1": 1,
        "model.layers.2": 2,
        "lm_head": "cpu",
        "model.layers.2.mlp": 1,
    }
    names = list(read_all(mixed_ckpt))
    expect: dict[str, list[int]] = {}
    for name in names:
        best = max((p for p in dm if _covers(p, name)), key=len)
        target = dm[best]
        expect[name] = [0 if target == "cpu" else int(target)]
    args = {
        "source": str(mixed_ckpt),
        "placement": {"kind": "device_map", "map": dm},
        "expect": expect,
    }
    results = check_all_ok(run_group(3, "load_placement", args))
    _check_read_once(results)
    assert "lm_head.weight" in results[0]["held"]


def test_auto_device_map(llama_ckpt: Path) -> None:
    args = {"source": str(llama_ckpt), "placement": {"kind": "device_map", "map": "balanced"}}
    results = check_all_ok(run_group(2, "load_placement", args))
    _check_read_once(results)
    assert all(r["held"] for r in results)
    assert not set(results[0]["held"]) & set(results[1]["held"])


MESH_RULES = [*LLAMA_RULES, ["model.experts.w1", ["shard", 1]]]
MESH_STAGES = [
    ["model.embed_tokens", "model.layers.0", "model.layers.1"],
    [
        "model.layers.2",
        "model.norm",
        "lm_head",
        "model.rotary",
        "model.position_ids",
        "model.step",
        "model.scale",
        "model.empty",
        "model.experts",
        "model.tiny",
    ],
]


@pytest.mark.parametrize("shm", [None, False], ids=["shared-memory", "multicast"])
def test_mesh_dp2_pp2_tp2_on_eight_processes(mixed_ckpt: Path, shm: bool | None) -> None:
    # rank = (d * pp + p) * tp + t: stage 0 -> ranks 0, 1, 4, 5; stage 1 -> 2, 3, 6, 7
    names = list(read_all(mixed_ckpt))
    expect = _holders_by_stage(names, [[0, 1, 4, 5], [2, 3, 6, 7]], MESH_STAGES)
    spec = {"kind": "mesh", "dp": 2, "pp": 2, "tp": 2, "rules": MESH_RULES, "stages": MESH_STAGES}
    args = {"source": str(mixed_ckpt), "placement": spec, "expect": expect, "shm": shm}
    results = check_all_ok(run_group(8, "load_placement", args, timeout=200))
    _check_read_once(results)
    first = results[0]
    # without shared memory, replicas (and stage-replicated tensors) are served by multicast
    assert first["exchange"].startswith("multicast" if shm is False else "shared"), first
    assert first["bytes_sent"] == first["planned_sent"], first
    # data-parallel replicas hold the same names
    assert results[0]["held"] == results[4]["held"]
    assert results[3]["held"] == results[7]["held"]


def test_pipeline_stages_move_their_buckets_concurrently_over_the_transport(
    mixed_ckpt: Path,
) -> None:
    """dp1 x pp2 x tp2 on 4 processes over gloo: each stage's p2p buckets are read inside the
    stage and involve only its two ranks, so a rank skips the other stage's buckets (they move
    meanwhile) and takes part in exactly the shared buckets the plan gives it; bit for bit."""
    names = list(read_all(mixed_ckpt))
    expect = _holders_by_stage(names, [[0, 1], [2, 3]], MESH_STAGES)
    spec = {"kind": "mesh", "dp": 1, "pp": 2, "tp": 2, "rules": MESH_RULES, "stages": MESH_STAGES}
    args = {"source": str(mixed_ckpt), "placement": spec, "expect": expect, "shm": False}
    results = check_all_ok(run_group(4, "load_placement", args, timeout=200))
    _check_read_once(results)
    first = results[0]
    assert first["bytes_sent"] == first["planned_sent"], first
    assert first["shared_buckets"] == first["planned_shared_buckets"], first
    assert all(n < first["plan_shared_buckets"] for n in first["shared_buckets"]), first
