"""Fixtures shared by the distributed tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distload.synthetic import LlamaShape, llama_tensors, write_checkpoint
from tests.distributed.cases import SHAPE


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bf16 Llama checkpoint (``SHAPE``) with an int64 ``step``, in several shards."""
    spec = {n: (s, torch.bfloat16) for n, s in llama_tensors(LlamaShape(**SHAPE)).items()}
    spec["step"] = ((), torch.int64)
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), spec, max_shard_bytes=20_000)
