"""Integrity manifests: build, verified loads, and corruption caught while reading."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import distload
from distload.cli import main
from distload.manifest import MANIFEST_NAME, build_manifest, write_manifest
from distload.synthetic import LlamaShape, write_llama
from tests.reference import read_all, same_bits


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    folder = write_llama(tmp_path / "ckpt", LlamaShape(), max_shard_bytes=100_000)
    write_manifest(build_manifest(folder, chunk_bytes=4096), folder / MANIFEST_NAME)
    return folder


def test_manifest_hashes_files_and_tensors(ckpt: Path) -> None:
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    ref = read_all(ckpt)
    emb = manifest["tensors"]["model.embed_tokens.weight"]
    raw = ref["model.embed_tokens.weight"].contiguous().view(-1).view(torch.uint8)
    assert emb["sha256"] == hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    assert len(emb["chunks"]) == -(-1000 // emb["rows_per_chunk"])


def test_verified_load_reads_once_and_is_exact(ckpt: Path) -> None:
    state = distload.load(ckpt, verify=True, bucket_bytes=50_000, device="cpu")
    ref = read_all(ckpt)
    assert all(same_bits(state[n], t) for n, t in ref.items())
    assert state.report.bytes_read == state.report.total_bytes


@pytest.mark.parametrize("where", [-10, -5000])
def test_flipped_byte_is_caught_and_named(ckpt: Path, where: int) -> None:
    shard = sorted(ckpt.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[where] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(distload.CheckpointError, match="do not match the manifest") as info:
        distload.load(ckpt, verify=True, device="cpu")
    assert info.value.file == shard.name and info.value.tensor
    assert info.value.phase == "read"
    # without verification the same flip goes unnoticed: that is what the manifest is for
    distload.load(ckpt, device="cpu")


def test_stale_or_missing_manifest(ckpt: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    (other / MANIFEST_NAME).unlink()
    with pytest.raises(distload.CheckpointError, match="distload manifest"):
        distload.load(other, verify=True, device="cpu")
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    manifest["files"][shard.name]["size"] += 1
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(distload.CheckpointError, match="does not match the manifest"):
        distload.load(ckpt, verify=True, device="cpu")


def test_cli_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_llama(tmp_path / "c", LlamaShape(layers=1))
    assert main(["manifest", str(folder), "--quiet", "--chunk-mb", "0.01"]) == 0
    assert (folder / MANIFEST_NAME).exists()
    assert "wrote" in capsys.readouterr().out
