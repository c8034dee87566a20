"""``variant=`` picks transformers' weight variants (``model.fp16.safetensors``, its sharded
index); a folder with several variants and no plain weights asks for one; the CLI names an
unreachable Hub without a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import distload
from distload.errors import CheckpointError
from distload.locate import choose_files, resolve_source
from tests.reference import read_all, same_bits


def _folder(tmp_path: Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """model.safetensors (fp32), model.fp16.safetensors, and a two-shard bf16 variant."""
    base = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5)}
    tensors = {
        "": base,
        "fp16": {k: v.half() for k, v in base.items()},
        "bf16": {k: v.bfloat16() for k, v in base.items()},
    }
    save_file(tensors[""], str(tmp_path / "model.safetensors"))
    save_file(tensors["fp16"], str(tmp_path / "model.fp16.safetensors"))
    shards = ["model.bf16-00001-of-00002.safetensors", "model.bf16-00002-of-00002.safetensors"]
    save_file({"a": tensors["bf16"]["a"]}, str(tmp_path / shards[0]))
    save_file({"b": tensors["bf16"]["b"]}, str(tmp_path / shards[1]))
    index = {"metadata": {"total_size": 34}, "weight_map": {"a": shards[0], "b": shards[1]}}
    (tmp_path / "model.safetensors.index.bf16.json").write_text(json.dumps(index))
    return tmp_path, tensors


@pytest.mark.parametrize("variant", [None, "fp16", "bf16"])
def test_variant_loads_that_variant_bit_for_bit(tmp_path: Path, variant: str | None) -> None:
    folder, tensors = _folder(tmp_path)
    state = distload.load(folder, variant=variant, device="cpu")
    want = tensors[variant or ""]
    assert set(state) == set(want)
    assert all(same_bits(state[k], want[k]) for k in want)


def test_a_missing_variant_names_those_present(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path)
    with pytest.raises(CheckpointError, match=r"no weights of variant 'int8'.*\['bf16', 'fp16'\]"):
        resolve_source(folder, variant="int8")


def test_variants_without_plain_weights_ask_for_one(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pass variant="):
        resolve_source(folder)
    assert resolve_source(folder, variant="fp16").single_file == "model.fp16.safetensors"
    # a lone variant file is still the only weights there
    assert choose_files(["model.fp16.safetensors"], None, "x") == (None, "model.fp16.safetensors")


def test_load_into_and_cli_take_variant(tmp_path: Path) -> None:
    folder, tensors = _folder(tmp_path)
    model = torch.nn.Module()
    model.register_parameter("a", torch.nn.Parameter(torch.empty(3, 4, device="meta")))
    model.register_parameter("b", torch.nn.Parameter(torch.empty(5, device="meta")))
    distload.load_into(model, folder, variant="fp16", device="cpu")
    assert same_bits(model.a.data, tensors["fp16"]["a"])
    done = subprocess.run(
        [sys.executable, "-m", "distload", "inspect", str(folder), "--variant", "bf16", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert listed["files"][0][0] == "model.bf16-00001-of-00002.safetensors"
    assert {t[2] for t in listed["tensors"]} == {"BF16"}
    assert read_all(folder)  # the plain weights are still what a bare folder reads


def test_cli_inspect_of_an_unreachable_hub_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path), "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-m", "distload", "inspect", "some-org/some-model"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PYTHONPATH": ":".join(sys.path)},
    )
    assert done.returncode != 0
    assert "Hub unreachable" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_hub_repositories_pick_the_variant_too() -> None:
    from distload.hub.ref import HubRef
    from distload.hub.remote import RemoteFile, Resolved, choose_weights

    names = ["config.json", "model.safetensors", "sub/model.fp16.safetensors"]
    names += ["sub/model.safetensors.index.bf16.json", "sub/model.bf16-00001-of-00001.safetensors"]
    files = {n: RemoteFile(n, 1, None, None) for n in names}
    top = Resolved(HubRef("org/name", "main", ""), "a" * 40, files, offline=False)
    sub = Resolved(HubRef("org/name", "main", "sub"), "a" * 40, files, offline=False)
    assert choose_weights(top) == (None, "model.safetensors")
    assert choose_weights(sub, "fp16") == (None, "model.fp16.safetensors")
    assert choose_weights(sub, "bf16") == ("model.safetensors.index.bf16.json", None)
    with pytest.raises(CheckpointError, match="pass variant="):
        choose_weights(sub)
