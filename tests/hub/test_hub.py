"""Hub sources end to end: the real huggingface_hub client against a fake Hub on 127.0.0.1.

Every load runs in real processes (gloo), checks each piece bit for bit against safetensors
reads of the files the server holds, and the server's request log is used to count what went
over the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distload.synthetic import LlamaShape, write_llama
from tests.distributed.launch import ROOT, check_all_ok, run_group
from tests.hub.fake_hub import FakeHub

pytestmark = pytest.mark.timeout(180)
REPO = "org/llama"
SCENARIOS = "tests.hub.scenarios"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(
        tmp_path_factory.mktemp("hubckpt"), LlamaShape(layers=3), max_shard_bytes=150_000
    )


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(
        tmp_path_factory.mktemp("hubckpt2"), LlamaShape(layers=3), max_shard_bytes=150_000, seed=7
    )


@pytest.fixture
def hub(ckpt: Path) -> Iterator[FakeHub]:
    server = FakeHub().start()
    server.add_folder(
        REPO,
        ckpt,
        extra={
            "config.json": json.dumps({"model_type": "llama"}).encode(),
            "pytorch_model.bin": b"\x80" * 4096,
            "optimizer.pt": b"\x80" * 4096,
            "flax_model.msgpack": b"\x00" * 4096,
        },
    )
    yield server
    server.stop()


def shards(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.glob("*.safetensors"))


def hub_env(hub: FakeHub, cache: Path | None = None, offline: bool = False) -> dict[str, str]:
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    }
    if cache is not None:
        env["HF_HUB_CACHE"] = str(cache)
    return env


def load_group(
    hub: FakeHub,
    world: int,
    args: dict[str, Any],
    *,
    cache: Path | None = None,
    offline: bool = False,
    timeout: float = 120,
) -> list[Any]:
    return run_group(
        world,
        "hub_load",
        args,
        timeout=timeout,
        extra_env=hub_env(hub, cache, offline),
        scenarios=SCENARIOS,
    )


def snapshot(cache: Path, commit: str) -> Path:
    return cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit


def assert_exact(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["bad"] == [], r["bad"]
        assert r["tensors"] > 0


def test_world4_shared_cache_fetches_each_shard_once(
    hub: FakeHub, ckpt: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    commit = hub.commit_of(REPO, "main")
    args = {
        "source": REPO,
        "tp": True,
        "expect_root": str(ckpt),
        "extra_files": ["config.json"],
    }
    results = check_all_ok(load_group(hub, 4, args, cache=cache))
    assert_exact(results)
    assert {r["commit"] for r in results} == {commit}
    assert {r["hub_cache"] for r in results} == {"shared"}
    names = shards(ckpt)
    for name in names:
        assert len(hub.downloads(name)) == 1, (name, hub.requests(contains=name))
    assert len(hub.downloads("config.json")) == 1
    # only what loading needs: no pickles, optimizer states or other formats
    for other in ("pytorch_model.bin", "optimizer.pt", "flax_model.msgpack"):
        assert hub.requests(contains=other) == []
    # planning read headers with range requests before any shard download began
    gets = [r for r in hub.requests("GET") if r.path.endswith(".safetensors")]
    first_full = next(i for i, r in enumerate(gets) if r.range is None)
    assert all(r.range is not None for r in gets[:first_full])
    assert len(gets[:first_full]) == len(names)
    # each byte from the Hub once: the ranks' downloads add up to the shards
    sizes = sum((ckpt / n).stat().st_size for n in names)
    assert sum(r["downloaded"] for r in results) == sizes + len(b'{"model_type": "llama"}')
    # every request after revision lookup names the pinned commit
    assert all(commit in r.path for r in hub.requests() if "/resolve/" in r.path)
    # the cache is valid for huggingface_hub itself afterwards
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert {r.commit_hash for r in repo.revisions} == {commit}
    snap = snapshot(cache, commit)
    for name in names:
        got = hashlib.sha256((snap / name).read_bytes()).hexdigest()
        assert got == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    assert (cache / "models--org--llama" / "refs" / "main").read_text() == commit
    assert all(r["files"]["config.json"].endswith("config.json") for r in results)


@pytest.mark.parametrize("mode", ["auto", "node"])
def test_node_local_caches_fetch_each_shard_once_per_job(
    hub: FakeHub, ckpt: Path, tmp_path: Path, mode: str
) -> None:
    caches = [str(tmp_path / f"node{n}") for n in (0, 0, 1, 1)]
    args = {
        "source": REPO,
        "tp": True,
        "expect_root": str(ckpt),
        "nodes": [0, 0, 1, 1],
        "caches": caches,
        "hub_cache": mode,
    }
    results = check_all_ok(load_group(hub, 4, args))
    assert_exact(results)
    assert {r["hub_cache"] for r in results} == {"2 caches"}
    commit = hub.commit_of(REPO, "main")
    for name in shards(ckpt):
        assert len(hub.downloads(name)) == 1, name
        held = [c for c in sorted(set(caches)) if (snapshot(Path(c), commit) / name).exists()]
        assert len(held) == 1, (name, held)  # in exactly one node's cache
    # storage read once per job, although each node holds only some shards
    assert results[0]["total_read"] == results[0]["total_bytes"]


def test_moving_branch_does_not_split_the_job(
    hub: FakeHub, ckpt: Path, other_ckpt: Path, tmp_path: Path
) -> None:
    first = hub.commit_of(REPO, "main")
    moved = hub.add_commit(
        REPO, {p.name: p.read_bytes() for p in other_ckpt.iterdir() if p.is_file()}
    )
    assert moved != first
    with hub.lock:  # main back to the first commit; it moves right after the first lookup
        hub.refs[REPO]["main"] = first
    hub.faults.move_after_info[(REPO, "main")] = moved
    args = {"source": REPO, "tp": True, "expect_root": str(ckpt)}
    results = check_all_ok(load_group(hub, 3, args, cache=tmp_path / "cache"))
    assert_exact(results)  # the first commit's bytes, on every rank
    assert {r["commit"] for r in results} == {first}
    assert hub.commit_of(REPO, "main") == moved  # the branch did move during the job
    assert len(hub.requests(contains="/revision/")) == 1  # resolved once, by rank 0
    assert not hub.requests(contains=moved)


def test_dropped_connection_resumes(hub: FakeHub, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "big"
    folder.mkdir()
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "embed.weight": torch.randn(3000, 1024, generator=gen),  # 12 MiB
        "head.weight": torch.randn(2000, 1024, generator=gen).to(torch.bfloat16),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    hub.add_folder("org/big", folder)
    size = (folder / "model.safetensors").stat().st_size
    # the client keeps whole 10 MiB chunks: drop the connection 2 MiB after the first one
    hub.faults.drop_after["model.safetensors"] = [12 * 2**20, 1]
    args = {"source": "hf://org/big@main", "expect_root": str(folder)}
    results = check_all_ok(load_group(hub, 2, args, cache=tmp_path / "cache"))
    assert_exact(results)
    gets = [r for r in hub.requests("GET", "model.safetensors") if r.range != "bytes=0-65535"]
    assert [r.range for r in gets] == [None, f"bytes={10 * 2**20}-"], gets
    assert sum(r.sent for r in gets) == size + 2 * 2**20  # resumed, not restarted


def test_wrong_bytes_are_refetched_once(hub: FakeHub, ckpt: Path, tmp_path: Path) -> None:
    name = shards(ckpt)[1]
    hub.faults.corrupt[name] = 1
    args = {"source": REPO, "expect_root": str(ckpt)}
    results = check_all_ok(load_group(hub, 2, args, cache=tmp_path / "cache"))
    assert_exact(results)
    assert len(hub.downloads(name)) == 2


def test_wrong_bytes_are_never_loaded(hub: FakeHub, ckpt: Path, tmp_path: Path) -> None:
    name = shards(ckpt)[1]
    hub.faults.corrupt[name] = -1
    cache = tmp_path / "cache"
    args = {"source": REPO, "tp": True, "expect_root": str(ckpt), "timeout": 20}
    outcomes = load_group(hub, 2, args, cache=cache)
    for o in outcomes:
        assert not o.ok, o
        assert o.error["type"] == "CheckpointError"
        assert o.error["phase"] == "download"
        message = o.error["message"]
        assert name in message and REPO in message and "rejected" in message, message
    sha = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    blobs = cache / "models--org--llama" / "blobs"
    assert not (blobs / sha).exists()
    commit = hub.commit_of(REPO, "main")
    assert not (snapshot(cache, commit) / name).exists()
    assert not list(blobs.glob("*.incomplete"))


def test_damaged_cache_entry_is_detected_and_refetched(
    hub: FakeHub, ckpt: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    args = {"source": REPO, "expect_root": str(ckpt)}
    check_all_ok(load_group(hub, 2, args, cache=cache))
    name = shards(ckpt)[2]
    blob = Path(os.path.realpath(snapshot(cache, hub.commit_of(REPO, "main")) / name))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit off
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    hub.clear_log()
    results = check_all_ok(load_group(hub, 2, args, cache=cache))
    assert_exact(results)
    assert [n for n in shards(ckpt) if hub.downloads(n)] == [name]
    # a second load with an intact cache fetches nothing
    hub.clear_log()
    results = check_all_ok(load_group(hub, 2, args, cache=cache))
    assert_exact(results)
    assert not [r for r in hub.requests() if "/resolve/" in r.path and r.range is None]
    assert sum(r["downloaded"] for r in results) == 0


def test_offline_mode_makes_no_request(hub: FakeHub, ckpt: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = {"source": REPO, "tp": True, "expect_root": str(ckpt)}
    check_all_ok(load_group(hub, 2, args, cache=cache))
    hub.clear_log()
    results = check_all_ok(load_group(hub, 2, args, cache=cache, offline=True))
    assert_exact(results)
    assert {r["commit"] for r in results} == {hub.commit_of(REPO, "main")}
    assert hub.requests() == []
    # a file missing from the cache: a clear error naming repo, revision and file, no request
    name = shards(ckpt)[0]
    (snapshot(cache, hub.commit_of(REPO, "main")) / name).unlink()
    outcomes = load_group(hub, 2, args, cache=cache, offline=True)
    for o in outcomes:
        assert not o.ok
        message = o.error["message"]
        assert REPO in message and "'main'" in message and name in message, message
        assert "offline" in message
    # an unknown revision offline
    outcomes = load_group(hub, 2, dict(args, revision="v9"), cache=cache, offline=True)
    assert all(not o.ok and "'v9'" in o.error["message"] for o in outcomes)
    assert hub.requests() == []


def test_tag_revision_and_subfolder(hub: FakeHub, ckpt: Path, tmp_path: Path) -> None:
    files = {f"weights/{p.name}": p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    commit = hub.add_commit("org/nested", files, tag="v1.0")
    args = {"source": "hf://org/nested@v1.0/weights", "tp": True, "expect_root": str(ckpt)}
    results = check_all_ok(load_group(hub, 2, args, cache=tmp_path / "cache"))
    assert_exact(results)
    assert {r["commit"] for r in results} == {commit}
    tag_ref = tmp_path / "cache" / "models--org--nested" / "refs" / "v1.0"
    assert tag_ref.read_text() == commit


def test_pickle_only_repo_is_refused(hub: FakeHub, tmp_path: Path, ckpt: Path) -> None:
    hub.add_commit("org/pickled", {"pytorch_model.bin": b"\x80" * 64, "config.json": b"{}"})
    outcomes = load_group(
        hub, 2, {"source": "org/pickled", "expect_root": str(ckpt)}, cache=tmp_path / "c"
    )
    for o in outcomes:
        assert not o.ok and "pickle" in o.error["message"], o.error
    assert not hub.requests(contains="pytorch_model.bin")


def test_unknown_repo_fails_on_every_rank(hub: FakeHub, tmp_path: Path, ckpt: Path) -> None:
    outcomes = load_group(
        hub, 2, {"source": "org/absent", "expect_root": str(ckpt)}, cache=tmp_path / "c"
    )
    for o in outcomes:
        assert not o.ok and "org/absent" in o.error["message"], o.error
        assert o.error["ranks"] == [0]


@pytest.mark.parametrize("kind", ["exception", "kill", "stall_short"])
def test_download_phase_failures(hub: FakeHub, ckpt: Path, tmp_path: Path, kind: str) -> None:
    args = {
        "source": REPO,
        "expect_root": str(ckpt),
        "timeout": 4.0,
        "hook": {"victim": 1, "kind": kind, "stall": 1.5},
    }
    outcomes = load_group(hub, 3, args, cache=tmp_path / "cache", timeout=60)
    if kind == "stall_short":
        assert all(o.ok for o in outcomes), outcomes
        return
    if kind == "kill":
        assert outcomes[1].returncode == -signal.SIGKILL
    for o in outcomes:
        if kind == "kill" and o.rank == 1:
            continue
        assert not o.ok, o
        assert o.error["phase"] == "download", o.error
        if o.rank != 1:
            assert 1 in o.error["ranks"], o.error
            assert o.seconds < 4.0 + 15, o


def test_lock_left_by_a_killed_process_does_not_block(
    hub: FakeHub, ckpt: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    name = shards(ckpt)[0]
    sha = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    lock = cache / ".locks" / "models--org--llama" / f"{sha}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys, filelock; filelock.FileLock(sys.argv[1]).acquire(); "
            "os.kill(os.getpid(), signal.SIGKILL)",
            str(lock),
        ],
        check=False,
    )
    assert holder.returncode == -signal.SIGKILL and lock.exists()
    results = check_all_ok(
        load_group(hub, 2, {"source": REPO, "expect_root": str(ckpt), "timeout": 20}, cache=cache)
    )
    assert_exact(results)


def test_cli_inspect_plans_from_headers_only(hub: FakeHub, ckpt: Path, tmp_path: Path) -> None:
    env = dict(os.environ, **hub_env(hub, tmp_path / "cache"), PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "distload", "inspect", REPO, "--revision", "main"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    ).stdout
    assert hub.commit_of(REPO, "main") in out
    for name in shards(ckpt):
        assert name in out
        assert hub.downloads(name) == []  # headers only: range requests
        assert all(r.range for r in hub.requests("GET", name))
