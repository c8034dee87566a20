"""Real multi-process loads on gloo, compared bit for bit with single-process safetensors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from distload import directio
from distload.execute import STAGING_ARENAS
from distload.residency import cached_range
from distload.synthetic import LlamaShape, write_llama
from tests.distributed.cases import LLAMA_RULES, MIXED_RULES
from tests.distributed.launch import check_all_ok, run_group

pytestmark = pytest.mark.timeout(240)


def _configs(world: int, mixed: Path, llama: Path, single: Path) -> list[dict[str, Any]]:
    m, lm = str(mixed), str(llama)
    configs: list[dict[str, Any]] = [
        {"name": "replicate", "source": m},
        # tensors cut into row pieces, each loaded whole and unchanged (the copy fast paths)
        {"name": "replicate-small-buckets", "source": m, "bucket_bytes": 3000},
        {"name": "tp-mixed", "source": m, "rules": MIXED_RULES},
        {"name": "tp-mixed-out", "source": m, "rules": MIXED_RULES, "out": True},
        {
            "name": "tp-upcast-small-buckets",
            "source": m,
            "rules": MIXED_RULES,
            "dtype": "float32",
            "bucket_bytes": 3000,
        },
        {"name": "replicate-downcast-out", "source": m, "dtype": "bfloat16", "out": True},
        {"name": "tp-llama", "source": lm, "rules": LLAMA_RULES, "bucket_bytes": 20_000},
        {"name": "single-file", "source": str(single)},
    ]
    if world % 2 == 0 and world > 2:
        configs.append({"name": "tp2-dp", "source": m, "rules": MIXED_RULES, "tp": 2})
    if world > 1:  # the same loads through the transport instead of same-node shared memory
        configs += [
            dict(c, name=f"{c['name']}-transport", shm=False)
            for c in configs
            if c["name"] in ("replicate", "tp-upcast-small-buckets", "tp-llama", "tp2-dp")
        ]
        # shared buckets read by every rank from the page cache (gather reads straight into
        # the destinations, casts and column blocks from mappings), and always through slots
        paths = ("replicate", "replicate-small-buckets", "tp-mixed-out", "tp-llama")
        configs += [
            dict(c, name=f"{c['name']}-page-cache-{mode}", page_cache=mode)
            for c in configs
            for mode in ("force", "0")
            if c["name"] in (*paths, "tp-upcast-small-buckets", "replicate-downcast-out")
            and (mode == "force" or c["name"] in paths)
        ]
        # two simulated nodes, every file cached on both: each rank reads its own parts
        # (no reader, no transfer); and the same files through the transport
        nodes = [r * 2 // world for r in range(world)]
        configs += [
            dict(c, name=f"{c['name']}-2node-page-cache-{mode}", nodes=nodes, page_cache=mode)
            for c in configs
            for mode in ("force", "0")
            if c["name"] in ("replicate", "tp-mixed-out", "tp-llama", "tp-upcast-small-buckets")
        ]
        # what decides (default mode): each node's first rank reports its page cache, and a
        # file counts only when every node holds it (the probes' answers are set here)
        second = nodes.index(1)  # the first rank of node 1
        configs += [
            dict(c, name=f"{c['name']}-2node-{name}", nodes=nodes, resident=resident)
            for c in configs
            if c["name"] == "tp-mixed-out"
            for name, resident in (
                ("resident-everywhere", [True] * world),
                ("not-resident-on-node-1", [r != second for r in range(world)]),
            )
        ]
    if world == 4:  # data-parallel replicas served member by member instead of by multicast
        configs.append(
            {
                "name": "tp2-dp-transport-no-multicast",
                "source": m,
                "rules": MIXED_RULES,
                "tp": 2,
                "shm": False,
                "multicast": False,
            }
        )
    return configs


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_loads_are_bit_exact(
    world: int, mixed_ckpt: Path, llama_ckpt: Path, single_file_ckpt: Path
) -> None:
    configs = _configs(world, mixed_ckpt, llama_ckpt, single_file_ckpt)
    results = check_all_ok(run_group(world, "matrix", {"configs": configs}, timeout=200))
    for i, cfg in enumerate(configs):
        per_rank = [r[i] for r in results]
        first = per_rank[0]
        # every rank sees the same report
        assert all(r["bytes_read"] == first["bytes_read"] for r in per_rank), cfg["name"]
        # read once: every checkpoint byte is read by exactly one rank
        assert sum(first["bytes_read"]) == first["total_bytes"], (cfg["name"], first)
        # what is sent is what is received, and what the plan's accounting says
        assert sum(first["bytes_sent"]) == sum(first["bytes_received"]), cfg["name"]
        assert first["bytes_sent"] == first["planned_sent"], (cfg["name"], first)
        assert first["bytes_received"] == first["planned_received"], (cfg["name"], first)
        assert all(c > 0 for c in first["cpu_seconds"]), (cfg["name"], first)
        # how shared buckets moved
        if world == 1:
            assert first["exchange"] == "none"
        elif cfg.get("page_cache") == "force" or (
            cfg.get("nodes") and cfg["name"].endswith("resident-everywhere")
        ):
            # every shared bucket read from the page cache by every rank itself (on one node
            # no shared-memory slot is made then: no bucket would use one)
            cached, _, shared = first["exchange"].removeprefix("page cache for ").partition(" of ")
            assert cached == shared.removesuffix(" shared buckets"), (cfg, first)
            assert first["exchange"].startswith("page cache for"), (cfg, first)
            # and nothing moves: the arguments' all_gather (two over several nodes: the page
            # cache reports), rank 0's plan, its agreement, the destinations' agreement, and
            # the status checks; then the closing all_gather of reports
            reports = 1 if cfg.get("nodes") else 0
            want = 4 + reports + first["status_checks"]
            assert first["operations"] == [want] * world, (cfg, first)
        elif cfg.get("nodes"):
            assert "page cache" not in first["exchange"], (cfg, first)
            assert not first["exchange"].startswith("shared memory"), (cfg, first)
        elif cfg.get("shm") is False:
            multicast = cfg.get("tp") == 2 and cfg.get("multicast") is not False
            assert first["exchange"].startswith("multicast") == multicast, (cfg, first)
        elif cfg.get("page_cache") == "0":
            assert first["exchange"] == "shared memory", (cfg, first)
        elif first["exchange"].startswith("page cache for"):  # (default) every file cached
            cached, _, shared = first["exchange"].removeprefix("page cache for ").partition(" of ")
            assert cached == shared.removesuffix(" shared buckets"), (cfg, first)
        else:
            assert first["exchange"].startswith("shared memory"), (cfg, first)
        if cfg["name"] in ("replicate-page-cache-force", "replicate-2node-page-cache-force"):
            # every rank read its whole copy itself, straight into its tensors: one kernel
            # copy per byte, none by distload
            assert first["copied"] == [0] * world, first
            assert first["kernel_copied"] == [first["total_bytes"]] * world, first
        # staging stays within the read-ahead ring plus two buffers (pack and receive, or the
        # two shared-memory slots), one bucket each, and the O_DIRECT bounce buffers
        if cfg.get("bucket_bytes"):
            bound = STAGING_ARENAS * cfg["bucket_bytes"] + 64 * 64
            assert max(first["staging"]) <= bound, (cfg, first)


def _header_pages(root: Path) -> int:
    """Bytes of the pages holding the safetensors headers of a checkpoint's files."""
    total = 0
    for path in sorted(root.glob("*.safetensors")):
        with open(path, "rb") as fh:
            end = 8 + int.from_bytes(fh.read(8), "little")
        total += -(-end // 4096) * 4096
    return total


def _direct_io_here(folder: Path) -> bool:
    """Whether this filesystem takes O_DIRECT reads and the kernel tells cached blocks."""
    probe = folder / "probe.bin"
    probe.write_bytes(b"x" * 4096)
    try:
        fd = os.open(probe, os.O_RDONLY)
        try:
            told = cached_range(fd, 0, 4096) is not None
        finally:
            os.close(fd)
        return told and directio.open_direct(probe) is not None
    finally:
        probe.unlink()


@pytest.mark.parametrize("world", [1, 3, 4])
def test_cold_loads_read_with_o_direct(
    world: int, tmp_path: Path, mixed_ckpt: Path, llama_ckpt: Path
) -> None:
    """Checkpoints the page cache does not hold are read with O_DIRECT (bounce buffers, one
    copy out), bit for bit, each byte once; with ``direct_io=False`` through the page cache.
    Private copies: no other test warms them."""
    mixed = shutil.copytree(mixed_ckpt, tmp_path / "mixed")
    llama = write_llama(
        tmp_path / "llama",
        LlamaShape(vocab=4000, hidden=256, intermediate=688, layers=3),
        max_shard_bytes=3_000_000,
    )
    bucket = 1 << 20  # four bounce buffers of 248 KiB: many blocks, split pieces
    configs: list[dict[str, Any]] = [
        {
            "name": "cold-tp-llama-buffered",
            "source": str(llama),
            "rules": LLAMA_RULES,
            "cold": True,
            "direct_io": False,
            "bucket_bytes": bucket,
        },
        {"name": "cold-replicate", "source": str(mixed), "cold": True},
        {
            "name": "cold-tp-mixed-out",
            "source": str(mixed),
            "rules": MIXED_RULES,
            "out": True,
            "cold": True,
        },
        {
            "name": "cold-tp-llama",
            "source": str(llama),
            "rules": LLAMA_RULES,
            "cold": True,
            "bucket_bytes": bucket,
        },
        {
            "name": "cold-tp-llama-upcast",
            "source": str(llama),
            "rules": LLAMA_RULES,
            "dtype": "float32",
            "cold": True,
        },
    ]
    if world > 1:  # the same large pieces through slots and the transport, read buffered
        configs += [
            {
                "name": "warm-tp-llama-slots",
                "source": str(llama),
                "rules": LLAMA_RULES,
                "page_cache": "0",
                "bucket_bytes": bucket,
            },
            {"name": "warm-replicate-llama-transport", "source": str(llama), "shm": False},
        ]
        configs.append(
            {
                "name": "cold-tp-llama-transport",
                "source": str(llama),
                "rules": LLAMA_RULES,
                "cold": True,
                "shm": False,
                "bucket_bytes": bucket,
            }
        )
    direct_here = _direct_io_here(tmp_path)
    results = check_all_ok(run_group(world, "matrix", {"configs": configs}, timeout=200))
    for i, cfg in enumerate(configs):
        first = results[0][i]
        total = first["total_bytes"]
        assert sum(first["bytes_read"]) == total, (cfg["name"], first)
        direct = sum(first["direct"])
        if not cfg.get("cold"):
            continue
        if cfg.get("direct_io") is False or not direct_here:
            assert direct == 0, (cfg["name"], first)
            assert sum(first["kernel_copied"]) == total, (cfg["name"], first)
            continue
        # every byte read with O_DIRECT, but for pieces whose pages the page cache holds:
        # those in the pages of the files' headers, which planning read
        kernel = sum(first["kernel_copied"])
        assert direct + kernel == total and 0 < direct, (cfg["name"], first)
        assert kernel <= _header_pages(Path(cfg["source"])), (cfg["name"], first)
        if world == 1 and not cfg.get("dtype"):
            # each byte reaches its tensor with at most one CPU copy, out of a bounce buffer;
            # a run whose tensor happens to lie at the file's alignment modulo 4 KiB takes
            # the DMA itself and is copied by no one (so copies may fall below the direct
            # bytes, never above what is held)
            assert 0 < sum(first["copied"]) <= sum(first["held"]), (cfg["name"], first)
        if cfg.get("bucket_bytes"):
            bound = STAGING_ARENAS * cfg["bucket_bytes"] + 64 * 64
            assert max(first["staging"]) <= bound, (cfg, first)


def test_tp_sharded_ranks_receive_only_their_slice(llama_ckpt: Path) -> None:
    """With colwise/rowwise TP nobody receives a full copy of a sharded tensor."""
    cfg = {"source": str(llama_ckpt), "rules": LLAMA_RULES}
    results = check_all_ok(run_group(4, "matrix", {"configs": [cfg]}, timeout=120))
    report = results[0][0]
    replicated = 2 * 64 * 4 + 64 * 4  # norms in bf16 (bytes)
    # each rank receives at most its quarter of the sharded bytes plus the replicated norms,
    # plus the unsharded lm_head (not in the rules)
    lm_head = 1000 * 64 * 2
    for received in report["bytes_received"]:
        assert received <= report["total_bytes"] / 4 + replicated + lm_head + 4096


def test_env_bootstrap_initialises_the_group(mixed_ckpt: Path) -> None:
    """distload initialises the process group itself from torchrun-style variables."""
    cfg = {"source": str(mixed_ckpt), "rules": MIXED_RULES}
    results = check_all_ok(run_group(2, "matrix", {"configs": [cfg]}, bootstrap="env", timeout=120))
    assert sum(results[0][0]["bytes_read"]) == results[0][0]["total_bytes"]


def test_a_device_mesh_as_group(llama_ckpt: Path) -> None:
    results = check_all_ok(run_group(2, "mesh_group_load", {"source": str(llama_ckpt)}))
    for r in results:
        assert "2-d DeviceMesh" in r["refused"] and "mesh['tp']" in r["refused"], r


def test_large_parts_cross_nodes_straight_into_their_tensors(tmp_path: Path) -> None:
    """Two simulated nodes, shards read through the transport: column blocks of a megabyte
    or more travel as messages of their own and land straight in their receivers' tensors
    (the reader packs them once), rows that lie contiguous are sent as they were read. So
    distload's own copies stay within one per byte held, over all ranks, bit for bit; with
    every tensor replicated (broadcasts), only the readers copy large tensors, once."""
    llama = write_llama(
        tmp_path / "llama",
        LlamaShape(vocab=2000, hidden=1024, intermediate=4096, layers=1, heads=8, kv_heads=8),
        max_shard_bytes=12_000_000,
    )
    world = 4
    configs = [
        {
            "name": f"2node-{mode}",
            "source": str(llama),
            "rules": LLAMA_RULES,
            "nodes": [0, 0, 1, 1],
            "page_cache": "0",
            **extra,
        }
        for mode, extra in (("transport", {}), ("rank-0-reads", {"readers": [0]}))
    ]
    configs.append(
        {"name": "2node-replicate", "source": str(llama), "nodes": [0, 0, 1, 1], "page_cache": "0"}
    )
    results = check_all_ok(run_group(world, "matrix", {"configs": configs}, timeout=200))
    for i, cfg in enumerate(configs):
        first = results[0][i]
        assert sum(first["bytes_read"]) == first["total_bytes"], (cfg["name"], first)
        assert sum(first["bytes_received"]) > 1 << 20, (cfg["name"], first)
        assert sum(first["copied"]) <= sum(first["held"]), (cfg["name"], first)
        if "rules" not in cfg:  # each rank holds the whole checkpoint: readers copy it once
            assert sum(first["copied"]) < 2 * first["total_bytes"], (cfg["name"], first)
