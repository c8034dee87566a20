"""A real single-node Slurm cluster runs the slurm/ scripts with sbatch --wait."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.launchers.conftest import ROOT, launcher_env
from tests.launchers.slurm_cluster import SlurmCluster, missing

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.xdist_group("slurm"),  # one cluster at a time, on one xdist worker
    pytest.mark.skipif(missing() is not None, reason=str(missing())),
]
COMMON = ["--quiet", "--device", "cpu", "--timeout", "60"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.parametrize(
    ("script", "args", "extra"),
    [
        ("srun_tasks.sbatch", ["--tp", "4"], []),
        ("torchrun_per_node.sbatch", ["--tp", "2"], ["--nodes=1"]),
        ("srun_mpi.sbatch", ["--tp", "4"], []),
    ],
)
def test_sbatch_scripts(
    script: str,
    args: list[str],
    extra: list[str],
    small_ckpt: Path,
    cluster: SlurmCluster,
    tmp_path: Path,
) -> None:
    out = tmp_path / "job.out"
    res = cluster.sbatch(
        ROOT / "slurm" / script,
        str(small_ckpt),
        *args,
        *COMMON,
        output=out,
        extra=extra,
        env=launcher_env(),
    )
    text = out.read_text() if out.exists() else ""
    assert res.returncode == 0, (res.stderr, text[-3000:])
    assert "verify: every rank's pieces equal safetensors" in text
    assert "(1.00x the checkpoint, " in text


def test_broken_checkpoint_fails_the_job(
    corrupt_ckpt: Path, cluster: SlurmCluster, tmp_path: Path
) -> None:
    out = tmp_path / "job.out"
    res = cluster.sbatch(
        ROOT / "slurm" / "srun_tasks.sbatch",
        str(corrupt_ckpt),
        *COMMON,
        output=out,
        env=launcher_env(),
    )
    assert res.returncode != 0
    assert "CheckpointError" in out.read_text()


def test_killed_rank_ends_the_job(small_ckpt: Path, cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "crash.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --ntasks=3\n"
        f'srun --kill-on-bad-exit=1 "$PYTHON" {ROOT}/tests/launchers/crash_load.py '
        f"{small_ckpt}\n"
    )
    out = tmp_path / "job.out"
    start = time.monotonic()
    res = cluster.sbatch(script, output=out, env=launcher_env())
    assert res.returncode != 0
    assert time.monotonic() - start < 120
