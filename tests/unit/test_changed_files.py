"""A shard replaced or rewritten between planning and reading is caught by its reader
(size and header bytes checked against the plan), never read at the planned offsets."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import distload
from distload.execute import run as run_mod


def _rewrite_during_load(monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    """Run ``change()`` after the plan is made, right before the execute phase reads."""
    original = run_mod.ExecutePhase.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        change()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(run_mod.ExecutePhase, "run", run)


def _copy(ckpt: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    return folder, sorted(folder.glob("*.safetensors"))[0]


def test_same_tensors_with_a_longer_header(
    llama_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, shard = _copy(llama_ckpt, tmp_path)
    tensors = load_file(shard)

    def change() -> None:  # same tensors and data, a header of another length
        save_file(tensors, str(shard), metadata={"format": "pt", "note": "x" * 100})

    _rewrite_during_load(monkeypatch, change)
    with pytest.raises(distload.DistLoadError, match="replaced or rewritten") as info:
        distload.load(folder, device="cpu")
    assert shard.name in str(info.value) and info.value.phase == "read"


def test_same_size_other_header(
    llama_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, shard = _copy(llama_ckpt, tmp_path)

    def change() -> None:  # flip one byte inside the JSON header: same size
        data = bytearray(shard.read_bytes())
        at = data.index(b'"dtype"') + 2
        data[at] = ord("D") if data[at] != ord("D") else ord("d")
        shard.write_bytes(bytes(data))

    _rewrite_during_load(monkeypatch, change)
    with pytest.raises(distload.DistLoadError, match="header differs"):
        distload.load(folder, device="cpu")


def test_unchanged_files_load(llama_ckpt: Path) -> None:
    state = distload.load(llama_ckpt, device="cpu")
    for f in sorted(llama_ckpt.glob("*.safetensors")):
        for name, t in load_file(f).items():
            assert torch.equal(state[name].view(torch.uint8), t.view(torch.uint8))
