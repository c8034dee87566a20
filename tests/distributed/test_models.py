"""Loading into models: DTensor placements inferred from a model parallelised on meta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distload.synthetic import LlamaShape, llama_tensors, write_checkpoint
from tests.distributed.launch import check_all_ok, run_group

pytestmark = pytest.mark.timeout(240)
SHAPE = dict(vocab=120, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = {n: (s, torch.bfloat16) for n, s in llama_tensors(LlamaShape(**SHAPE)).items()}
    spec["step"] = ((), torch.int64)
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), spec, max_shard_bytes=20_000)


@pytest.mark.parametrize("world", [2, 4])
def test_load_into_parallelized_meta_model(world: int, tiny_ckpt: Path) -> None:
    args = {"source": str(tiny_ckpt), "shape": SHAPE}
    results = check_all_ok(run_group(world, "parallel_model", args))
    first = results[0]
    assert first["dtensors"] == 5 * SHAPE["layers"] + 1
    assert sum(first["read"]) == first["total"]  # read once, even into DTensors
    assert all(r["max_err"] <= 1e-5 for r in results)
