"""The failure matrix: every phase x every failure kind at world 3 (docs/failure-matrix.md).

For each case, every surviving rank must raise a DistLoadError naming the failing rank and a
phase (the phase of the failure, or the next one where a survivor noticed it), within the
timeout plus a margin; no process may be left running; a short stall must not fail the load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distload.errors import PHASES
from distload.synthetic import LlamaShape, write_llama
from tests.distributed.launch import run_group

pytestmark = pytest.mark.timeout(180)
WORLD = 3
TIMEOUT = 4.0
MARGIN = 8.0  # start-up of the victim's peers is not counted; probing peers takes <= 3 s
KINDS = ["exception", "exception@0", "kill", "stall_long", "stall_short"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(
        tmp_path_factory.mktemp("matrix"), LlamaShape(layers=3), max_shard_bytes=120_000
    )


# "download" (Hub sources) is covered in tests/hub; "shm-transfer" is the transfer phase
# through same-node shared-memory slots, "pagecache-transfer" the one where every rank reads
# its parts of a cached file itself (one node, beside shared memory), "pagecache-2node-transfer"
# the same over two simulated nodes (no shared memory), "transfer" the one through the
# transport (gloo)
LOCAL_TRANSFERS = {  # phase -> (hook, DISTLOAD_PAGE_CACHE, shm, node of every rank)
    "shm-transfer": ("transfer@shm", "0", True, None),
    "pagecache-transfer": ("transfer@pagecache", "force", True, None),
    "pagecache-2node-transfer": ("transfer@pagecache", "force", None, [0, 0, 1]),
}
MATRIX_PHASES = [p for p in PHASES if p != "download"] + list(LOCAL_TRANSFERS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("phase", MATRIX_PHASES)
def test_failure_matrix(phase: str, kind: str, ckpt: Path, tmp_path: Path) -> None:
    victim = 0 if kind == "exception@0" else 1
    base = kind.split("@", maxsplit=1)[0]
    local = phase in LOCAL_TRANSFERS
    hook, page_cache, shm, nodes = LOCAL_TRANSFERS.get(
        phase, (None, "auto", False if phase == "transfer" else None, None)
    )
    label, phase = phase, "transfer" if local else phase
    args = {
        "source": str(ckpt),
        "phase": phase,
        "shm": shm,
        "nodes": nodes,
        "hook": hook,
        "kind": base,
        "victim": victim,
        "timeout": TIMEOUT,
        "bucket_bytes": 30_000,
        "stall": TIMEOUT + 6 if base == "stall_long" else TIMEOUT * 0.3,
    }
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    outcomes = run_group(
        WORLD,
        "failure_case",
        args,
        timeout=120,
        extra_env={"DISTLOAD_SHM_DIR": str(shm_dir), "DISTLOAD_PAGE_CACHE": page_cache},
    )
    # shared-memory staging files are gone, also those of a killed rank
    assert not list(shm_dir.iterdir()), sorted(p.name for p in shm_dir.iterdir())
    # no process left running: run_group waited for every one (a hang raises)
    results = {o.rank: o.result for o in outcomes}
    log = os.environ.get("DISTLOAD_MATRIX_LOG")
    if log:  # a record per case, to regenerate docs/failure-matrix.md
        with open(log, "a") as fh:
            fh.write(
                json.dumps(
                    {
                        "phase": label,
                        "kind": kind,
                        "results": results,
                        "returncodes": [o.returncode for o in outcomes],
                    }
                )
                + "\n"
            )
    if base == "stall_short":
        assert all(o.ok and o.result["ok"] for o in outcomes), outcomes
        return
    if base == "kill":
        assert outcomes[victim].returncode == -9
    survivors = [r for r in range(WORLD) if r != victim or base == "exception"]
    later = PHASES[PHASES.index(phase) :]
    for r in survivors:
        res = results[r]
        assert res is not None and not res["ok"], (r, outcomes[r])
        if r == victim:  # the failing rank itself reports its own failure
            assert "injected failure" in res["message"], res
            continue
        assert res["type"] in ("DistLoadError", "PeerError", "CheckpointError", "PlacementError"), (
            res
        )
        assert res["phase"] in later, (phase, res)
        assert victim in res["ranks"] or (victim == 0 and res["type"] == "PeerError"), res
        assert res["seconds"] < TIMEOUT + MARGIN, res
