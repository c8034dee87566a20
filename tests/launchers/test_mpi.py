"""Real MPI launches (MPICH from PyPI): torch and MPI transports, and crashes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.launchers.conftest import launcher_env, run

pytest.importorskip("mpi4py", reason="needs mpi4py (pip install mpi4py mpich)")
pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs mpiexec (pip install mpich)"),
]
COMMON = ["--quiet", "--timeout", "60"]


@pytest.mark.parametrize("transport", ["torch", "mpi"])
@pytest.mark.parametrize("np_", [2, 4])
def test_mpirun(np_: int, transport: str, small_ckpt: Path) -> None:
    res = run(
        ["bash", "launch/mpirun.sh", str(small_ckpt), "--tp", str(np_), "--device", "cpu", *COMMON],
        launcher_env(NP=str(np_), TRANSPORT=transport),
    )
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert "verify: every rank's pieces equal safetensors" in res.stdout
    assert f"world {np_} on 1 node(s)" in res.stdout


def test_three_ranks_mpi_transport(small_ckpt: Path) -> None:
    res = run(
        ["bash", "launch/mpirun.sh", str(small_ckpt), "--tp", "3", *COMMON],
        launcher_env(NP="3", TRANSPORT="mpi"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "verify: every rank's pieces equal safetensors" in res.stdout


@pytest.mark.parametrize("transport", ["torch", "mpi"])
def test_broken_checkpoint_fails_every_rank(transport: str, corrupt_ckpt: Path) -> None:
    res = run(
        ["bash", "launch/mpirun.sh", str(corrupt_ckpt), "--device", "cpu", *COMMON],
        launcher_env(NP="2", TRANSPORT=transport),
    )
    assert res.returncode != 0
    assert res.stderr.count("CheckpointError") >= 2  # raised on both ranks


@pytest.mark.parametrize("transport", ["torch", "mpi"])
def test_killed_rank_ends_the_job(transport: str, small_ckpt: Path) -> None:
    start = time.monotonic()
    env = launcher_env()
    res = run(
        [
            "mpiexec",
            "-n",
            "3",
            env["PYTHON"],
            "tests/launchers/crash_load.py",
            str(small_ckpt),
            "--transport",
            transport,
        ],
        env,
        timeout=120,
    )
    assert res.returncode != 0
    assert time.monotonic() - start < 90
