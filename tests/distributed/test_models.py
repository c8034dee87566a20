"""Loading into models: DTensor placements inferred from a model parallelised on meta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distload.synthetic import write_checkpoint
from tests.distributed.cases import SHAPE
from tests.distributed.launch import check_all_ok, run_group

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("world", [2, 4])
def test_load_into_parallelized_meta_model(world: int, tiny_ckpt: Path) -> None:
    args = {"source": str(tiny_ckpt), "shape": SHAPE}
    results = check_all_ok(run_group(world, "parallel_model", args))
    first = results[0]
    assert first["dtensors"] == 5 * SHAPE["layers"] + 1
    assert sum(first["read"]) == first["total"]  # read once, even into DTensors
    assert all(r["max_err"] <= 1e-5 for r in results)


@pytest.fixture(scope="module")
def fused_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for i in range(2):
        spec[f"h.{i}.attn.c_attn.weight"] = ((24, 72), torch.bfloat16)  # Conv1D (in, 3 * out)
        spec[f"h.{i}.attn.c_attn.bias"] = ((72,), torch.float32)
        spec[f"h.{i}.qkv.weight"] = ((40, 24), torch.bfloat16)  # GQA fused: 24 + 8 + 8 rows
        spec[f"h.{i}.ln.weight"] = ((24,), torch.float32)
    return write_checkpoint(tmp_path_factory.mktemp("fused"), spec, max_shard_bytes=6000)


@pytest.mark.parametrize("world", [2, 3])
def test_split_fused_and_transpose_with_tp(world: int, fused_ckpt: Path) -> None:
    args = {"source": str(fused_ckpt), "gqa_sizes": [24, 8, 8], "bucket_bytes": 2000}
    results = check_all_ok(run_group(world, "load_transformed", args))
    assert sum(results[0]["read"]) == results[0]["total"]  # nothing read twice


def test_as_dtensor_and_fully_shard(tiny_ckpt: Path) -> None:
    args = {"source": str(tiny_ckpt), "shape": SHAPE, "tp": 2}
    results = check_all_ok(run_group(4, "dtensor_models", args))
    assert results[0]["checked"] > 10
    assert sum(results[0]["read"]) == results[0]["total"]


def test_out_dtensors_are_filled_in_place(tiny_ckpt: Path) -> None:
    results = check_all_ok(run_group(4, "dtensor_out", {"source": str(tiny_ckpt)}))
    assert all(r["loaded"] > 10 for r in results)
    assert sum(results[0]["read"]) == results[0]["total"]
    for r in results:  # the wrong global shape is refused on every rank, naming it
        assert "DTensor of global shape" in r["error"] or "local shape" in r["error"], r
