"""Real torchrun launches through the launch/ wrappers: one node, two simulated nodes, crashes."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.launchers.conftest import ROOT, free_port, launcher_env, run

pytestmark = pytest.mark.timeout(240)
COMMON = ["--quiet", "--device", "cpu", "--timeout", "60"]


@pytest.mark.parametrize("nproc", [2, 3, 4])
def test_single_node(nproc: int, small_ckpt: Path) -> None:
    res = run(
        ["bash", "launch/torchrun_single_node.sh", str(small_ckpt), "--tp", str(nproc), *COMMON],
        launcher_env(NPROC=str(nproc)),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "verify: every rank's pieces equal safetensors" in res.stdout
    assert f"world {nproc} on 1 node(s)" in res.stdout
    assert "(1.00x the checkpoint, " in res.stdout


def test_two_simulated_nodes_with_c10d_rendezvous(small_ckpt: Path) -> None:
    port = str(free_port())
    procs = []
    for node in (0, 1):
        env = launcher_env(
            NPROC="2",
            NNODES="2",
            RDZV_HOST="127.0.0.1",
            RDZV_PORT=port,
            RDZV_ID=f"test-{port}",
            NODE_RANK=str(node),
        )
        procs.append(
            subprocess.Popen(
                ["bash", "launch/torchrun_multi_node.sh", str(small_ckpt), "--tp", "4", *COMMON],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    report = next(o[0] for o in outs if "distload:" in o[0])
    assert "world 4 on 2 node(s)" in report  # the planner saw two nodes
    assert "verify: every rank's pieces equal safetensors" in report


def test_broken_checkpoint_fails_every_rank(corrupt_ckpt: Path) -> None:
    start = time.monotonic()
    res = run(
        ["bash", "launch/torchrun_single_node.sh", str(corrupt_ckpt), "--tp", "2", *COMMON],
        launcher_env(NPROC="2"),
    )
    assert res.returncode != 0
    assert "CheckpointError" in res.stderr and "truncated" in res.stderr
    assert time.monotonic() - start < 60


def test_killed_rank_ends_the_job(small_ckpt: Path) -> None:
    start = time.monotonic()
    res = run(
        [
            launcher_env()["PYTHON"],
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "3",
            "tests/launchers/crash_load.py",
            str(small_ckpt),
        ],
        launcher_env(),
        timeout=120,
    )
    assert res.returncode != 0
    assert time.monotonic() - start < 90
    # torchrun's report names the failing rank and its signal (or a survivor's PeerError
    # got out first)
    named = re.search(r"rank\s*:\s*1\b", res.stderr) and "SIGKILL" in res.stderr
    assert named or "PeerError" in res.stderr, res.stderr[-2000:]
