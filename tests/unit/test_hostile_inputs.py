"""Hostile or broken inputs end in a clear error naming what is wrong, never a silent wrong
tensor or a raw internal exception: duplicate index entries, an empty weight_map, shapes no
memory can hold, overlapping out= tensors, arguments of the wrong type, and more shards than
the process may open at once."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distload
from distload.checkpoint import read_checkpoint, read_header
from distload.errors import CheckpointError, DistLoadError, PlacementError
from distload.synthetic import write_checkpoint
from tests.reference import read_all, same_bits


def _raw(path: Path, header: dict) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    return path


@pytest.mark.parametrize("shape", [[0, 2**70], [0, 2**62, 2**62], [2**63, 0], [0] * 65])
def test_shapes_no_memory_can_hold_are_refused(tmp_path: Path, shape: list[int]) -> None:
    path = _raw(
        tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
    )
    with pytest.raises(CheckpointError, match="out of bounds") as info:
        read_header(path)
    assert info.value.tensor == "w" and info.value.file == "x.safetensors"


def test_an_index_naming_a_tensor_twice_is_refused(tmp_path: Path) -> None:
    write_checkpoint(
        tmp_path, {"a": ((2,), torch.float32), "b": ((2,), torch.float32)}, max_shard_bytes=8
    )
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    files = sorted(set(data["weight_map"].values()))
    text = json.dumps(data).replace('"weight_map": {', f'"weight_map": {{"a": "{files[1]}", ')
    index.write_text(text)
    with pytest.raises(CheckpointError, match="'a' is listed twice"):
        read_checkpoint(tmp_path)


def test_an_empty_weight_map_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"a": ((2,), torch.float32)}, max_shard_bytes=4)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {}
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="weight_map is empty"):
        read_checkpoint(tmp_path)


def test_overlapping_out_tensors_are_refused(llama_ckpt: Path) -> None:
    ref = read_all(llama_ckpt)
    names = sorted(ref)
    big = torch.empty(sum(ref[n].numel() for n in names) + 8, dtype=torch.bfloat16)
    out, at = {}, 0
    for n in names:
        out[n] = big[at : at + ref[n].numel()].view(ref[n].shape)
        at += ref[n].numel()
    state = distload.load(llama_ckpt, out=out, device="cpu")  # separate views of one buffer
    assert all(same_bits(state[n], ref[n]) for n in names)
    a, b = names[0], names[1]
    shifted = dict(out, **{b: big[4 : 4 + ref[b].numel()].view(ref[b].shape)})  # inside a
    with pytest.raises(DistLoadError, match="share memory") as info:
        distload.load(llama_ckpt, out=shifted, device="cpu")
    assert f"out[{a!r}] and out[{b!r}] on rank 0" in str(info.value)
    # the same tensor under two names is a tie: the checkpoint must hold identical bytes
    norms = [n for n in names if n.endswith("layernorm.weight")]
    tied = dict(out, **{norms[1]: out[norms[0]]})
    with pytest.raises(DistLoadError, match="checkpoint holds different bytes") as info:
        distload.load(llama_ckpt, out=tied, device="cpu")
    assert info.value.phase == "close" and norms[1] in str(info.value)


def test_a_declared_tie_with_identical_bytes_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    emb = torch.randn(8, 4)
    tensors = {"embed.weight": emb, "head.weight": emb.clone(), "n": torch.ones(3)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shared = torch.empty(8, 4)
    out = {"embed.weight": shared, "head.weight": shared, "n": torch.empty(3)}
    state = distload.load(tmp_path, out=out, device="cpu")
    assert state["embed.weight"] is shared and state["head.weight"] is shared
    assert torch.equal(shared, emb)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"placement": "colwise"}, PlacementError, "placement must be"),
        ({"placement": {"*.q_proj.weight": "colwise"}}, PlacementError, "TensorParallel"),
        ({"out": {"model.norm.weight": None}}, DistLoadError, "not a torch.Tensor"),
        ({"device": "tpu9"}, ValueError, "tpu9"),
    ],
    ids=["string", "rules-dict", "out-none", "bad-device"],
)
def test_arguments_of_the_wrong_kind(
    llama_ckpt: Path, kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        distload.load(llama_ckpt, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build")
def test_cuda_on_a_cpu_only_build(llama_ckpt: Path) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        distload.load(llama_ckpt, device="cuda:0")


def test_more_shards_than_the_open_file_limit(tmp_path: Path) -> None:
    """300 shards under a soft limit of 64 open files: the reader keeps a bounded set open."""
    spec = {f"t{i}": ((4, 4), torch.float32) for i in range(300)}
    write_checkpoint(tmp_path, spec, max_shard_bytes=64)
    assert len(list(tmp_path.glob("*.safetensors"))) == 300
    code = (
        "import resource, sys, torch, distload\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        f"state = distload.load({str(tmp_path)!r}, device='cpu')\n"
        "from tests.reference import read_all, same_bits\n"
        f"ref = read_all({str(tmp_path)!r})\n"
        "assert set(state) == set(ref) and all(same_bits(state[n], ref[n]) for n in ref)\n"
        "print('ok', len(state))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and "ok 300" in done.stdout, done.stderr[-2000:]
