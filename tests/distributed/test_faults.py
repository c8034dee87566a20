"""Every failure ends the load on every rank with the same clear error, fast, never a hang."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.cases import MIXED_RULES
from tests.distributed.launch import Outcome, check_all_ok, run_group
from tests.distributed.matrix_table import record_case

pytestmark = pytest.mark.timeout(120)
WORLD = 3


def _broken_copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _index(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _write_index(folder: Path, data: dict[str, Any]) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(data))


def _failures(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    return check_all_ok(outcomes)


def _expect(
    folder: Path | str,
    *,
    kind: str,
    phase: str,
    contains: list[str],
    rules: list[list[Any]] | None = None,
    sabotage: dict[str, Any] | None = None,
    timeout: float = 30,
    ranks: list[int] | None = None,
) -> list[dict[str, Any]]:
    cfg = {"source": str(folder), "rules": rules or [], "timeout": timeout}
    errors = _failures(
        run_group(WORLD, "expect_failure", {"cfg": cfg, "sabotage": sabotage}, timeout=90)
    )
    for err in errors:
        assert err["type"] == kind, err
        assert err["phase"] == phase, err
        for text in contains:
            assert text in err["message"], (text, err["message"])
        if ranks is not None:
            assert err["ranks"] == ranks, err
    # every rank raised the very same error
    assert len({e["message"] for e in errors}) == 1
    return errors


def test_missing_shard(mixed_ckpt: Path, tmp_path: Path) -> None:
    folder = _broken_copy(mixed_ckpt, tmp_path)
    victim = _shards(folder)[1]
    victim.unlink()
    errors = _expect(
        folder, kind="CheckpointError", phase="index", contains=[victim.name, "missing"], ranks=[0]
    )
    assert errors[0]["file"] == victim.name


def test_truncated_shard(mixed_ckpt: Path, tmp_path: Path) -> None:
    folder = _broken_copy(mixed_ckpt, tmp_path)
    victim = _shards(folder)[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[:-100])
    errors = _expect(
        folder, kind="CheckpointError", phase="index", contains=[victim.name, "truncated"]
    )
    assert errors[0]["tensor"]


def test_corrupted_header(mixed_ckpt: Path, tmp_path: Path) -> None:
    folder = _broken_copy(mixed_ckpt, tmp_path)
    victim = _shards(folder)[0]
    data = bytearray(victim.read_bytes())
    data[8:24] = b"\xff\xfe garbage!!!!!!"
    victim.write_bytes(bytes(data))
    _expect(folder, kind="CheckpointError", phase="index", contains=[victim.name, "not valid JSON"])


def test_huge_header_length(mixed_ckpt: Path, tmp_path: Path) -> None:
    folder = _broken_copy(mixed_ckpt, tmp_path)
    victim = _shards(folder)[0]
    data = bytearray(victim.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    victim.write_bytes(bytes(data))
    _expect(folder, kind="CheckpointError", phase="index", contains=[victim.name, "exceeds"])


def test_index_names_tensor_header_lacks(mixed_ckpt: Path, tmp_path: Path) -> None:
    folder = _broken_copy(mixed_ckpt, tmp_path)
    index = _index(folder)
    shard = _shards(folder)[0].name
    index["weight_map"]["model.ghost.weight"] = shard
    _write_index(folder, index)
    errors = _expect(
        folder,
        kind="CheckpointError",
        phase="index",
        contains=["model.ghost.weight", shard, "no such tensor"],
    )
    assert errors[0]["tensor"] == "model.ghost.weight"


def test_weight_map_escaping_folder(mixed_ckpt: Path, tmp_path: Path) -> None:
    folder = _broken_copy(mixed_ckpt, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(_shards(folder)[0], outside)
    index = _index(folder)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../outside.safetensors"
    _write_index(folder, index)
    _expect(
        folder,
        kind="CheckpointError",
        phase="index",
        contains=["../outside.safetensors", "escapes"],
    )


def test_rule_with_missing_dim(mixed_ckpt: Path) -> None:
    rules = [["*.q_proj.weight", ["shard", 2]]]
    errors = _expect(
        mixed_ckpt,
        kind="PlacementError",
        phase="plan",
        contains=["q_proj.weight", "dim 2", "shape"],
        rules=rules,
    )
    assert errors[0]["tensor"].endswith("q_proj.weight")


def test_rank_read_error_mid_load(mixed_ckpt: Path) -> None:
    """A reader failing mid-transfer ends every rank with its error; the group stays usable."""
    cfg = {"source": str(mixed_ckpt), "rules": MIXED_RULES, "bucket_bytes": 4000, "timeout": 30}
    args = {"cfg": cfg, "sabotage": {"kind": "read_error", "rank": 1, "after": 2}, "then_load": cfg}
    errors = _failures(run_group(WORLD, "expect_failure", args, timeout=90))
    for err in errors:
        assert err["ranks"] == [1], err
        assert "Input/output error (injected)" in err["message"]
        assert err["phase"] == "read"
        assert err["type"] == "CheckpointError"
        assert err["file"] and err["tensor"], err
        assert err["seconds"] < 20
        # the next load in the same process group succeeds
        assert sum(err["after"]["bytes_read"]) == err["after"]["total_bytes"]


# over the transport with status checks only every 1000 shared buckets: a failed rank keeps to
# the schedule (unfilled sends) until the closing check, which shares its failure
UNCHECKED = {"DISTLOAD_CHECK_EVERY": "1000"}


@pytest.mark.parametrize(
    ("sabotage", "victim", "message"),
    [
        # rank 1's 12th read is past the first shared bucket (the one check before the end)
        ({"kind": "read_error", "rank": 1, "after": 12}, 1, "Input/output error (injected)"),
        # bucket 28 is a p2p bucket rank 2 reads, after the first shared bucket's check
        ({"kind": "raise", "rank": 2, "at": 29}, 2, "injected failure in the transfer loop"),
    ],
    ids=["read-error", "exception"],
)
def test_failure_between_status_checks_is_shared(
    mixed_ckpt: Path, sabotage: dict[str, Any], victim: int, message: str
) -> None:
    cfg = {
        "source": str(mixed_ckpt),
        "rules": MIXED_RULES,
        "bucket_bytes": 4000,
        "timeout": 30,
        "shm": False,
    }
    args = {"cfg": cfg, "sabotage": sabotage, "then_load": cfg}
    errors = _failures(run_group(WORLD, "expect_failure", args, timeout=90, extra_env=UNCHECKED))
    for err in errors:
        assert err["ranks"] == [victim], err
        assert message in err["message"]
        if sabotage["kind"] == "read_error":
            assert err["phase"] == "read" and err["type"] == "CheckpointError", err
        assert err["seconds"] < 20
        # the next load in the same process group succeeds
        assert sum(err["after"]["bytes_read"]) == err["after"]["total_bytes"]


def test_rank_raising_in_transfer_loop(mixed_ckpt: Path) -> None:
    cfg = {"source": str(mixed_ckpt), "rules": MIXED_RULES, "bucket_bytes": 4000, "timeout": 30}
    args = {"cfg": cfg, "sabotage": {"kind": "raise", "rank": 2, "at": 3}}
    errors = _failures(run_group(WORLD, "expect_failure", args, timeout=90))
    for err in errors:
        assert err["ranks"] == [2]
        assert "injected failure in the transfer loop" in err["message"]


@pytest.mark.parametrize("page_cache", ["0", "force"])
def test_killed_rank_ends_peers_within_timeout(mixed_ckpt: Path, page_cache: str) -> None:
    """Through shared-memory slots the survivors wait on the killed rank's buckets; when every
    rank reads the page cache itself none waits on it before the closing step."""
    cfg = {
        "source": str(mixed_ckpt),
        "rules": MIXED_RULES,
        "bucket_bytes": 4000,
        "timeout": 5,
        "page_cache": page_cache,
    }
    args = {"cfg": cfg, "sabotage": {"kind": "kill", "rank": 1, "at": 3}}
    outcomes = run_group(WORLD, "expect_failure", args, timeout=60)
    assert outcomes[1].returncode == -9
    phases = ("read", "transfer") if page_cache == "0" else ("read", "transfer", "close")
    for o in (outcomes[0], outcomes[2]):
        assert o.ok, o
        assert o.result["type"] == "PeerError", o.result
        assert o.result["ranks"] == [1], o.result
        assert o.result["phase"] in phases, o.result
        assert o.result["seconds"] < 5 + 10


def test_stalled_rank_past_timeout(mixed_ckpt: Path) -> None:
    cfg = {"source": str(mixed_ckpt), "rules": MIXED_RULES, "bucket_bytes": 4000, "timeout": 3}
    args = {"cfg": cfg, "sabotage": {"kind": "stall", "rank": 1, "at": 3, "seconds": 12}}
    outcomes = run_group(WORLD, "expect_failure", args, timeout=60)
    for o in (outcomes[0], outcomes[2]):
        assert o.ok, o
        assert o.result["type"] == "PeerError"
        assert 1 in o.result["ranks"], o.result
        # its own wait timed out, or it was waiting on a survivor whose wait did first and
        # left the load naming the stalled rank
        message = o.result["message"]
        assert "no answer within 3 s" in message or "its error naming ranks [1]" in message, message
        assert o.result["seconds"] < 3 + 8


def test_polled_waits_end_at_the_deadline(mixed_ckpt: Path) -> None:
    """The waits NCCL needs (poll completion against the deadline, then abort), run on gloo
    through the same code path: a stalled peer ends every other rank at the timeout."""
    cfg = {
        "source": str(mixed_ckpt),
        "rules": MIXED_RULES,
        "bucket_bytes": 4000,
        "timeout": 3,
        "shm": False,
    }
    args = {"cfg": cfg, "sabotage": {"kind": "stall", "rank": 1, "at": 3, "seconds": 12}}
    env = {"DISTLOAD_POLL_WAITS": "1"}
    outcomes = run_group(WORLD, "expect_failure", args, timeout=60, extra_env=env)
    record_case(
        "rank 1 stalls 12 s in a transfer, waits polled as for NCCL (timeout 3 s)",
        [o.result if o.ok else {} for o in outcomes],
        victim=1,
    )
    for o in (outcomes[0], outcomes[2]):
        assert o.ok, o
        assert o.result["type"] == "PeerError", o.result
        assert "no answer within 3 s" in o.result["message"], o.result["message"]
        assert "polled" in o.result["message"], o.result["message"]
        assert o.result["seconds"] < 3 + 8


def test_stall_shorter_than_timeout_is_not_a_failure(mixed_ckpt: Path) -> None:
    cfg = {"source": str(mixed_ckpt), "rules": MIXED_RULES, "bucket_bytes": 4000, "timeout": 20}
    outcomes = run_group(WORLD, "stalled_load", {"cfg": cfg, "rank": 1, "seconds": 2}, timeout=90)
    check_all_ok(outcomes)


def test_manifest_catches_a_flipped_byte_on_every_rank(tmp_path: Path) -> None:
    from distload.manifest import MANIFEST_NAME, build_manifest, write_manifest
    from distload.synthetic import LlamaShape, write_llama

    folder = write_llama(tmp_path / "ckpt", LlamaShape(), max_shard_bytes=100_000)
    write_manifest(build_manifest(folder, chunk_bytes=8192), folder / MANIFEST_NAME)
    ok = check_all_ok(run_group(WORLD, "verified_load", {"source": str(folder)}))
    assert sum(ok[0]["read"]) == ok[0]["total"]  # verification keeps read-once
    shard = sorted(folder.glob("*.safetensors"))[2]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1
    shard.write_bytes(bytes(data))
    outcomes = run_group(WORLD, "verified_load", {"source": str(folder)})
    messages = {o.error["message"] for o in outcomes}
    assert len(messages) == 1 and all(not o.ok for o in outcomes)
    err = outcomes[0].error
    assert err["type"] == "CheckpointError" and err["file"] == shard.name
    assert "do not match the manifest" in err["message"]


MULTICAST = {"rules": MIXED_RULES, "tp": 2, "shm": False, "bucket_bytes": 4000}


@pytest.mark.parametrize("victim", [0, 1, 3])
def test_killed_rank_inside_multicasts_ends_every_survivor(mixed_ckpt: Path, victim: int) -> None:
    """dp2 x tp2 over the transport: replicas are served by multicast through sub-groups; a
    rank killed mid-load (reader, relay or plain member) ends every survivor with a PeerError
    within the timeout, never a hang in a sub-group's broadcast."""
    cfg = {"source": str(mixed_ckpt), "timeout": 5, **MULTICAST}
    args = {"cfg": cfg, "sabotage": {"kind": "kill", "rank": victim, "at": 4}}
    outcomes = run_group(4, "expect_failure", args, timeout=90)
    assert outcomes[victim].returncode == -9
    for o in outcomes:
        if o.rank == victim:
            continue
        assert o.ok, o
        assert o.result["type"] == "PeerError", o.result
        assert o.result["phase"] in ("read", "transfer"), o.result
        assert o.result["seconds"] < 5 + 10


def test_exception_inside_multicasts_is_shared_and_the_next_load_works(
    mixed_ckpt: Path,
) -> None:
    cfg = {"source": str(mixed_ckpt), "timeout": 30, **MULTICAST}
    args = {
        "cfg": cfg,
        "sabotage": {"kind": "raise", "rank": 2, "at": 3},
        "then_load": cfg,
    }
    errors = _failures(run_group(4, "expect_failure", args, timeout=90))
    for err in errors:
        assert err["ranks"] == [2], err
        assert "injected failure in the transfer loop" in err["message"]
        after = err["after"]
        assert after["exchange"].startswith("multicast"), after
        assert sum(after["bytes_read"]) == after["total_bytes"]
