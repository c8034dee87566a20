"""Pipeline stages, device maps and a dp x pp x tp mesh on real gloo groups, bit for bit."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import pytest

import distload
from tests.distributed.cases import LLAMA_RULES
from tests.distributed.launch import check_all_ok, run_group
from tests.reference import chunk, read_all

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
    if shm is None:  # through the slots, even though the files just written are page cached
        args["page_cache"] = "0"
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


ROUTED = re.compile(r"\.experts\.(\d+)\.")  # a routed expert's tensor (not shared_experts)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Qwen3-MoE-shaped checkpoint: 2 layers of 8 routed experts, plus a shared
    expert per layer (named as DeepSeek names it), in several shards."""
    import torch

    from distload.shapes import MoeShape, moe_tensors
    from distload.synthetic import write_checkpoint

    shape = MoeShape(hidden=16, layers=2, heads=4, kv_heads=2, head_dim=4, experts=8,
                     expert_ffn=12, vocab=40)  # fmt: skip
    spec = {name: (dims, torch.bfloat16) for name, dims in moe_tensors(shape).items()}
    for layer in range(shape.layers):
        p = f"model.layers.{layer}.mlp.shared_experts"
        spec[f"{p}.gate_proj.weight"] = ((12, 16), torch.float32)
        spec[f"{p}.down_proj.weight"] = ((16, 12), torch.float32)
    return write_checkpoint(tmp_path_factory.mktemp("moe"), spec, max_shard_bytes=6000)


def _dense_dim(name: str, ndim: int) -> int | None:
    """The shard dim the qwen3_moe preset gives a tensor outside the routed experts."""
    for pattern, spec in distload.preset("qwen3_moe").items():
        if fnmatch.fnmatchcase(name, pattern):
            if spec in ("colwise", "colwise_gather_output", "embedding_rowwise"):  # dim 0
                return 0
            return ndim - 1 if spec == "rowwise" and ndim >= 2 else None
    return None


def _expert_expectation(
    names: dict[str, int], world: int, tp: int, ep: int, etp: int
) -> list[dict[str, Any]]:
    """rank -> name -> [dim, chunks, index] (None: whole), stated independently of the library:
    rank r (one stage) is expert-TP rank r % etp of expert group (r // etp) % ep; expert e of
    8 lives in group e // (8 // ep); other tensors are TP-sliced over ``tp`` consecutive ranks."""
    out: list[dict[str, Any]] = [{} for _ in range(world)]
    for name, ndim in names.items():
        match = ROUTED.search(name)
        for rank in range(world):
            if match is None:
                dim = _dense_dim(name, ndim)
                out[rank][name] = None if dim is None or tp == 1 else [dim, tp, rank % tp]
                continue
            if (rank // etp) % ep != int(match.group(1)) // (8 // ep):
                continue
            dim = 0 if name.endswith(("gate_proj.weight", "up_proj.weight")) else 1
            out[rank][name] = None if etp == 1 else [dim, etp, rank % etp]
    return out


@pytest.mark.parametrize(
    ("spec", "shm"),
    [
        ({"kind": "mesh", "dp": 2, "pp": 1, "tp": 2, "ep": 2, "expert_tp": 1}, None),
        ({"kind": "mesh", "dp": 2, "pp": 1, "tp": 2, "ep": 2, "expert_tp": 1}, False),
        ({"kind": "expert_parallel", "expert_tp": 2}, None),
    ],
    ids=["mesh-dp2-tp2-ep2-shm", "mesh-dp2-tp2-ep2-transport", "expert-parallel-etp2"],
)
def test_expert_parallel_on_four_processes(
    moe_ckpt: Path, spec: dict[str, Any], shm: bool | None
) -> None:
    """Routed experts spread over expert groups (replicated across expert-data-parallel copies
    or cut over expert_tp ranks), attention TP-sliced, every byte read once, bit for bit."""
    reference = read_all(moe_ckpt)
    names = {n: t.dim() for n, t in reference.items()}
    tp = spec.get("tp", 4)
    ep = spec.get("ep", 4 // spec["expert_tp"])
    expect = _expert_expectation(names, 4, tp, ep, spec["expert_tp"])
    args = {"source": str(moe_ckpt), "placement": spec, "expect": expect, "shm": shm}
    results = check_all_ok(run_group(4, "load_experts", args, timeout=200))
    first = results[0]
    assert sum(first["read"]) == first["total"]
    expert_bytes = sum(
        t.numel() * t.element_size() for n, t in reference.items() if ROUTED.search(n)
    )
    # each rank ends with 1/ep of the routed experts' bytes when they are whole, 1/(ep*etp)
    # when cut: no rank holds more than its share
    dense = [
        sum(
            (reference[n] if w is None else chunk(reference[n], *w)).numel()
            * reference[n].element_size()
            for n, w in mine.items()
            if not ROUTED.search(n)
        )
        for mine in expect
    ]
    share = expert_bytes // (ep * spec["expert_tp"])
    assert [h - d for h, d in zip(first["held_bytes"], dense, strict=True)] == [share] * 4
