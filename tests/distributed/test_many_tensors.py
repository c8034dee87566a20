"""A checkpoint of tens of thousands of small tensors (e.g. per-expert biases and scales): the
load stays exact and groups them into a few buckets, so per-tensor costs are plain bookkeeping
(no collective, read request or status check per tensor)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from distload.checkpoint import read_checkpoint
from distload.planner import make_plan
from distload.synthetic import write_checkpoint
from tests.distributed.launch import check_all_ok, run_group

pytestmark = pytest.mark.timeout(240)

COUNT = 20_000


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for i in range(COUNT):
        dtype = (torch.bfloat16, torch.float32, torch.int32)[i % 3]
        spec[f"model.experts.{i // 8}.w{i % 8}"] = ((i % 5 + 1, 3), dtype)
    return write_checkpoint(tmp_path_factory.mktemp("many"), spec, max_shard_bytes=200_000)


def test_plan_groups_small_tensors_into_few_buckets(many: Path) -> None:
    index = read_checkpoint(many)
    assert len(index.tensors) == COUNT and len(index.files) > 1
    plan = make_plan(index, 4, None, bucket_bytes=64 * 1024)
    # buckets are bounded by bytes, not by tensor count: ~total / bucket + one per file edge
    assert len(plan.buckets) <= index.total_bytes // (64 * 1024) + 2 * len(index.files) + 8


def test_many_small_tensors_load_exactly(many: Path) -> None:
    rules: list[list[Any]] = [["model.experts.*.w0", ["shard", 0]], ["*.w1", ["shard", 1]]]
    cfg = {"source": str(many), "rules": rules, "bucket_bytes": 64 * 1024}
    for world in (1, 2):
        results = check_all_ok(run_group(world, "matrix", {"configs": [cfg]}, timeout=200))
        report = results[0][0]
        assert sum(report["bytes_read"]) == report["total_bytes"]
