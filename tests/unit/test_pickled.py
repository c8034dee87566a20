"""Opt-in .bin/.pt checkpoints: refused by default; with allow_pickle, described through the
weights-only unpickler (never executed) and read as byte ranges like safetensors."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import distload
from distload.checkpoint import read_checkpoint


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sd = {
        "w": torch.randn(6, 4, generator=gen).to(torch.bfloat16),
        "b": torch.randn(4, generator=gen),
        "ids": torch.arange(9),
        "flag": torch.tensor([True, False]),
    }
    sd["w_tail"] = sd["w"][2:]  # a view sharing w's storage, at an offset
    return sd


def test_refused_by_default(tmp_path: Path) -> None:
    torch.save(_state(), tmp_path / "pytorch_model.bin")
    with pytest.raises(distload.CheckpointError, match="allow_pickle=True"):
        distload.load(tmp_path, device="cpu")


def test_single_file_equals_torch_load(tmp_path: Path) -> None:
    torch.save(_state(), tmp_path / "pytorch_model.bin")
    state = distload.load(tmp_path, allow_pickle=True, device="cpu")
    ref = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert set(state) == set(ref)
    for name, t in ref.items():
        assert state[name].dtype == t.dtype and torch.equal(state[name], t), name


def test_sharded_bin_index_with_tp(tmp_path: Path) -> None:
    sd = _state()
    torch.save({"w": sd["w"], "b": sd["b"]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"ids": sd["ids"]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {
        "metadata": {"total_size": 6 * 4 * 2 + 4 * 4 + 9 * 8},
        "weight_map": {
            "w": "pytorch_model-00001-of-00002.bin",
            "b": "pytorch_model-00001-of-00002.bin",
            "ids": "pytorch_model-00002-of-00002.bin",
        },
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert len(read_checkpoint(tmp_path, allow_pickle=True).tensors) == 3
    state = distload.load(
        tmp_path, distload.TensorParallel({"w": "colwise"}), allow_pickle=True, device="cpu"
    )
    assert torch.equal(state["w"], sd["w"]) and torch.equal(state["ids"], sd["ids"])


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, ("touch /tmp/distload-pwned-marker",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_code_in_the_pickle_is_never_run(tmp_path: Path, protocol: int) -> None:
    marker = Path("/tmp/distload-pwned-marker")
    marker.unlink(missing_ok=True)
    torch.save({"x": torch.ones(2)}, tmp_path / "good.pt")
    with zipfile.ZipFile(tmp_path / "good.pt") as z:
        records = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in records if n.endswith("data.pkl"))
    records[pkl] = pickle.dumps({"x": _Evil()}, protocol=protocol)
    with zipfile.ZipFile(tmp_path / "evil.pt", "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, data)
    with pytest.raises(distload.CheckpointError, match="weights-only unpickler"):
        distload.load(tmp_path / "evil.pt", allow_pickle=True, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not a zip at all", "not a zip-format"),
        ([1, 2], "flat state dict"),
        ({"x": 3}, "not a tensor"),
    ],
)
def test_malformed_archives(tmp_path: Path, payload: object, message: str) -> None:
    path = tmp_path / "m.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    with pytest.raises(distload.CheckpointError, match=message):
        distload.load(path, allow_pickle=True, device="cpu")


def test_compressed_storage_record_is_refused(tmp_path: Path) -> None:
    """A storage record stored deflated is not its tensor's bytes: refused, never misread."""
    plain = tmp_path / "plain.bin"
    torch.save(_state(), plain)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(folder / "pytorch_model.bin", "w") as dst:
        for info in src.infolist():
            method = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            dst.writestr(info.filename, src.read(info.filename), compress_type=method)
    with pytest.raises(distload.CheckpointError, match="compressed or missing"):
        distload.load(folder, allow_pickle=True, device="cpu")
