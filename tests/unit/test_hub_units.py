"""Pure parts of Hub sources: names, file choice, download assignment, cache domains."""

from __future__ import annotations

from pathlib import Path

import pytest

from distload.checkpoint import read_checkpoint
from distload.errors import CheckpointError, PlacementError
from distload.hub.cache import file_digest, group_domains
from distload.hub.plan import HubPlan, assign_files
from distload.hub.ref import HubRef, parse_hub_source
from distload.hub.remote import RemoteFile, Resolved, check_member, choose_weights
from distload.placement import TensorParallel, preset
from distload.planner import make_plan
from distload.synthetic import LlamaShape, write_llama

COMMIT = "a" * 40


def test_parse_hub_source(tmp_path: Path) -> None:
    assert parse_hub_source("org/name") == HubRef("org/name", "main", "")
    assert parse_hub_source("org/name", "v1") == HubRef("org/name", "v1", "")
    assert parse_hub_source("hf://org/name@dev/sub/dir") == HubRef("org/name", "dev", "sub/dir")
    assert parse_hub_source("hf://gpt2") == HubRef("gpt2", "main", "")
    assert parse_hub_source("hf://org/name", subfolder="text") == HubRef("org/name", "main", "text")
    # local paths win, and path-like strings are never Hub ids
    local = tmp_path / "org"
    (local / "name").mkdir(parents=True)
    assert parse_hub_source(str(local / "name")) is None
    for text in ("./org/name", "/abs/path", "org/name.safetensors", "a/b/c", "gpt2", "~/x"):
        assert parse_hub_source(text) is None, text
    with pytest.raises(CheckpointError, match="revision"):
        parse_hub_source("hf://org/name@v1", "v2")
    with pytest.raises(CheckpointError, match="escapes"):
        parse_hub_source("hf://org/name@v1/../x")
    with pytest.raises(CheckpointError, match="not a valid"):
        parse_hub_source("hf://org/na me")
    assert HubRef("org/n", "main", "s").url(COMMIT) == f"hf://org/n@{COMMIT}/s"


def _resolved(names: list[str], sub: str = "") -> Resolved:
    files = {n: RemoteFile(n, 10, "b" * 64, None) for n in names}
    return Resolved(HubRef("org/n", "main", sub), COMMIT, files)


def test_choose_weights() -> None:
    assert choose_weights(_resolved(["model.safetensors.index.json", "a.safetensors"])) == (
        "model.safetensors.index.json",
        None,
    )
    assert choose_weights(_resolved(["model.safetensors", "config.json"])) == (
        None,
        "model.safetensors",
    )
    assert choose_weights(_resolved(["weights.safetensors"])) == (None, "weights.safetensors")
    assert choose_weights(_resolved(["u/model.safetensors", "model.safetensors"], "u")) == (
        None,
        "model.safetensors",
    )
    with pytest.raises(CheckpointError, match="pickle"):
        choose_weights(_resolved(["pytorch_model.bin", "config.json"]))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors\.index\.json"):
        choose_weights(_resolved(["a.safetensors", "b.safetensors"]))


def test_check_member() -> None:
    resolved = _resolved(["a.safetensors", "model.bin"])
    check_member(resolved, "a.safetensors", "index")
    for bad, match in [
        ("../a.safetensors", "escapes"),
        ("/a.safetensors", "escapes"),
        ("model.bin", "safetensors only"),
        ("b.safetensors", "not in org/n"),
        (7, "invalid"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            check_member(resolved, bad, "index")


def test_resolved_and_hub_plan_round_trip() -> None:
    resolved = Resolved(
        HubRef("org/n", "v1", "sub"),
        COMMIT,
        {"sub/a.safetensors": RemoteFile("sub/a.safetensors", 5, "c" * 64, None)},
    )
    assert Resolved.from_json(resolved.to_json()) == resolved
    plan = HubPlan(resolved, ((0, 1), (2,)), (("sub/a.safetensors", 2),), {"a": (2,)}, ())
    assert HubPlan.from_json(plan.to_json()) == plan
    assert plan.mode == "2 caches" and plan.domain_of(1) == (0, 1)


def test_assign_files_balances_bytes_and_keeps_files_in_one_domain() -> None:
    sizes = {"a": 100, "b": 90, "c": 50, "d": 40, "e": 10}
    downloader, allowed = assign_files(sizes, [(0, 1), (2, 3)], range(4))
    assert set(downloader) == set(sizes)
    per_domain = {0: 0, 1: 0}
    for name, rank in downloader.items():
        assert rank in allowed[name]
        per_domain[0 if rank < 2 else 1] += sizes[name]
    assert abs(per_domain[0] - per_domain[1]) <= 20
    # one domain (a shared cache): downloads spread over all ranks, any rank may read
    downloader, allowed = assign_files(sizes, [(0, 1, 2, 3)], range(4))
    assert len(set(downloader.values())) == 4
    assert all(a == (0, 1, 2, 3) for a in allowed.values())
    # readers restrict both
    downloader, allowed = assign_files(sizes, [(0, 1), (2, 3)], [1, 3])
    assert set(downloader.values()) <= {1, 3}
    with pytest.raises(PlacementError):
        assign_files(sizes, [(0, 1)], [2])


def test_group_domains() -> None:
    # ranks 0,1 share a folder; 2,3 share another; 4 could not write its probe
    seen = [{0, 1}, {0, 1}, {2, 3}, {2, 3}, set()]
    assert group_domains(seen) == [(0, 1), (2, 3), (4,)]
    assert group_domains([{0, 1, 2}] * 3) == [(0, 1, 2)]


def test_file_digest_matches_git_and_sha256(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    assert file_digest(path, git=True) == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert file_digest(path).startswith("5891b5b522d5df08")


def test_planner_reads_each_file_only_on_its_allowed_ranks(tmp_path: Path) -> None:
    ckpt = write_llama(tmp_path, LlamaShape(layers=2), max_shard_bytes=100_000)
    index = read_checkpoint(ckpt)
    files = [f.name for f in index.files]
    allowed = {name: ((0, 1) if i % 2 == 0 else (2, 3)) for i, name in enumerate(files)}
    plan = make_plan(
        index, 4, TensorParallel(preset("llama")), bucket_bytes=40_000, file_readers=allowed
    )
    assert plan.buckets
    for bucket in plan.buckets:
        for item in bucket.items:
            assert bucket.reader in allowed[plan.tensors[item.tensor].file]
    with pytest.raises(PlacementError, match="none of them a reader"):
        make_plan(index, 4, None, readers=[0], file_readers={files[0]: (1,)})
