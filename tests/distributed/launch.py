"""Run a scenario function in N real processes on gloo, with a hard timeout.

Each process runs ``python -m tests.distributed.worker``; the process group is made from a
``FileStore`` in a private temp folder (no TCP port to collide on under ``pytest -n auto``)
unless ``bootstrap="env"``, where distload itself initialises it from ``MASTER_ADDR`` /
``MASTER_PORT`` on a free port. Every process writes its outcome as JSON; a process that does
not finish in time is killed and reported as a hang.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Outcome:
    """What one rank reported (or that it hung / died)."""

    rank: int
    ok: bool
    result: Any = None
    error: dict[str, Any] | None = None
    returncode: int | None = None
    seconds: float = 0.0
    output: str = ""


def run_group(
    world: int,
    scenario: str,
    args: dict[str, Any] | None = None,
    *,
    timeout: float = 90.0,
    bootstrap: str = "filestore",
    extra_env: dict[str, str] | None = None,
    scenarios: str = "tests.distributed.scenarios",
) -> list[Outcome]:
    """Run ``tests.distributed.scenarios.<scenario>(args)`` on ``world`` ranks."""
    tmp = Path(tempfile.mkdtemp(prefix="distload-group-"))
    try:
        return _run_in(tmp, world, scenario, args, timeout, bootstrap, extra_env, scenarios)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_in(
    tmp: Path,
    world: int,
    scenario: str,
    args: dict[str, Any] | None,
    timeout: float,
    bootstrap: str,
    extra_env: dict[str, str] | None,
    scenarios: str,
) -> list[Outcome]:
    """:func:`run_group` in the scratch folder ``tmp`` (logs, results, the file store)."""
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
            "DISTLOAD_TEST_BOOTSTRAP": bootstrap,
            "DISTLOAD_TEST_DIR": str(tmp),
            "DISTLOAD_TEST_SCENARIOS": scenarios,
            "CUDA_VISIBLE_DEVICES": "",
        }
    )
    env.update(extra_env or {})
    procs = []
    logs = []
    for rank in range(world):
        penv = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        log = open(tmp / f"log-{rank}.txt", "w")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.distributed.worker",
                    scenario,
                    json.dumps(args or {}),
                ],
                cwd=ROOT,
                env=penv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    start = time.monotonic()
    deadline = start + timeout
    hung = False
    for proc in procs:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            hung = True
            break
    if hung:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for log in logs:
        log.close()
    outcomes = []
    for rank, proc in enumerate(procs):
        path = tmp / f"result-{rank}.json"
        output = (tmp / f"log-{rank}.txt").read_text()[-4000:]
        if path.exists():
            data = json.loads(path.read_text())
            outcomes.append(
                Outcome(
                    rank,
                    data["ok"],
                    data.get("result"),
                    data.get("error"),
                    proc.returncode,
                    data.get("seconds", 0.0),
                    output,
                )
            )
        else:
            outcomes.append(Outcome(rank, False, None, None, proc.returncode, 0.0, output))
    if hung:
        raise AssertionError(
            f"scenario {scenario} at world {world} did not finish within {timeout} s (hang)\n"
            + "\n".join(f"--- rank {o.rank}:\n{o.output}" for o in outcomes)
        )
    return outcomes


def check_all_ok(outcomes: list[Outcome]) -> list[Any]:
    bad = [o for o in outcomes if not o.ok]
    if bad:
        raise AssertionError(
            "\n".join(
                f"rank {o.rank} failed (rc={o.returncode}): {o.error}\n{o.output}" for o in bad
            )
        )
    return [o.result for o in outcomes]
