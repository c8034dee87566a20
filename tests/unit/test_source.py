"""The index and plan phases: describing a source, reading its index, and the coordinator's
messages that give every rank the same plan (thread-ranks, no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distload.errors import CheckpointError, DistLoadError
from distload.hub.options import HubOptions
from distload.options import LoadOptions
from distload.placement import TensorParallel, preset
from distload.plan import LoadPlan
from distload.source import Coordinator, SourceDescriptor, agree_on_plan, open_index
from tests.threads import ThreadTransport, run_threads

pytestmark = pytest.mark.timeout(60)


def _plan_on(
    world: int, source: str | Path, options: LoadOptions, names: list[str] | None = None
) -> list[LoadPlan | BaseException]:
    def step(net: ThreadTransport) -> LoadPlan:
        coordinator = Coordinator(
            source,
            TensorParallel(preset("llama")),
            options,
            world_size=world,
            nodes=[0] * world,
            names=names,
        )
        return agree_on_plan(net, coordinator, [0] * world)

    return run_threads(world, step)


def test_every_rank_gets_the_same_plan(llama_ckpt: Path) -> None:
    plans = _plan_on(3, llama_ckpt, LoadOptions(bucket_bytes=64 * 1024))
    assert all(isinstance(p, LoadPlan) for p in plans)
    assert plans[1] == plans[0] and plans[2] == plans[0]
    assert plans[0].token and len({p.token for p in plans}) == 1  # type: ignore[union-attr]
    assert plans[0].world_size == 3 and plans[0].bucket_bytes == 64 * 1024  # type: ignore[union-attr]


def test_environment_knobs_come_from_the_coordinator(
    llama_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTLOAD_MULTICAST", "0")
    monkeypatch.setenv("DISTLOAD_CHECK_EVERY", "5")
    plans = _plan_on(2, llama_ckpt, LoadOptions())
    assert all(p.multicast is False and p.check_every == 5 for p in plans)  # type: ignore[union-attr]


def test_a_bad_source_fails_every_rank_in_the_index_phase(tmp_path: Path) -> None:
    got = _plan_on(2, tmp_path / "missing", LoadOptions())
    assert all(isinstance(e, DistLoadError) and e.phase == "index" for e in got)
    assert all("does not exist" in str(e) and e.ranks == (0,) for e in got)


def test_out_names_missing_from_the_checkpoint_fail_in_the_plan_phase(llama_ckpt: Path) -> None:
    got = _plan_on(2, llama_ckpt, LoadOptions(), names=["model.norm.weight", "no.such"])
    assert all(isinstance(e, DistLoadError) and e.phase == "plan" for e in got)
    assert all("no.such" in str(e) for e in got)


def test_keys_absent_from_the_checkpoint_are_ignored(llama_ckpt: Path) -> None:
    q = "model.layers.0.self_attn.q_proj.weight"
    options = LoadOptions(keys=["model.norm.weight", q, "no.such"])
    plans = _plan_on(2, llama_ckpt, options)
    assert sorted(o.name for o in plans[0].outputs) == sorted([q, "model.norm.weight"])  # type: ignore[union-attr]


def test_descriptor_roundtrip_and_local_index(llama_ckpt: Path) -> None:
    described = SourceDescriptor(None, "abc")
    assert SourceDescriptor.from_json(described.to_json()) == described
    index, hub = open_index(llama_ckpt, HubOptions(), max_header_bytes=1 << 20)
    assert hub is None and index.tensors and Path(index.root) == llama_ckpt.resolve()


def test_local_source_refuses_hub_only_options(llama_ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="Hub sources only"):
        open_index(llama_ckpt, HubOptions(revision="main"), max_header_bytes=1 << 20)
