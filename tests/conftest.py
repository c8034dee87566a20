from __future__ import annotations

from pathlib import Path

import pytest

from distload.synthetic import LlamaShape, write_checkpoint, write_llama
from tests.reference import make_mixed_checkpoint


@pytest.fixture(scope="session")
def mixed_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded checkpoint with bf16/fp32/int/bool/0-d/empty/3-d tensors and odd shapes."""
    return make_mixed_checkpoint(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small bf16 Llama-shaped checkpoint in several shards."""
    return write_llama(tmp_path_factory.mktemp("llama"), LlamaShape(), max_shard_bytes=150_000)


@pytest.fixture(scope="session")
def single_file_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    folder = tmp_path_factory.mktemp("single")
    spec = {"a.weight": ((33, 7), torch.bfloat16), "b.bias": ((7,), torch.float32)}
    write_checkpoint(folder, spec, single_file=True)
    return folder / "model.safetensors"
