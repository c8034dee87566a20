from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distload.synthetic import LlamaShape, write_llama

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(
        tmp_path_factory.mktemp("launch"), LlamaShape(layers=4), max_shard_bytes=150_000
    )


@pytest.fixture(scope="session")
def corrupt_ckpt(small_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corrupt") / "ckpt"
    shutil.copytree(small_ckpt, folder)
    victim = sorted(folder.glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-64])
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(var, None)
    env.update(
        PYTHON=sys.executable,
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        CUDA_VISIBLE_DEVICES="",
    )
    env.update(extra)
    return env


def run(
    cmd: list[str], env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run a launcher command with a hard timeout (a hang fails the test)."""
    return subprocess.run(
        cmd,
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
