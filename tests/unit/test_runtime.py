"""Launcher detection and its precedence, with plain environment dicts."""

from __future__ import annotations

import pytest

from distload.errors import DistLoadError
from distload.runtime import detect, first_host, slurm_port

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29400",
}
SRUN = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_NODELIST": "gpu[07-10]",
    "SLURM_STEP_NODELIST": "gpu[07-10]",
}
SBATCH_SCRIPT = {
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "8",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-10]",
}
OMPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
MPICH = {"PMI_RANK": "1", "PMI_SIZE": "3", "MPI_LOCALRANKID": "1"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ("single", 0, 1, 0, 0)),
        (TORCHRUN, ("torchrun", 3, 8, 1, 1)),
        (SRUN, ("slurm", 5, 8, 1, 2)),
        (OMPI, ("mpi", 2, 4, 0, 0)),
        (MPICH, ("mpi", 1, 3, 1, 0)),
        ({**SRUN, **TORCHRUN}, ("torchrun", 3, 8, 1, 1)),  # torchrun started by srun
        ({**SRUN, **MPICH}, ("slurm", 5, 8, 1, 2)),  # srun --mpi=pmi2
        (SBATCH_SCRIPT, ("single", 0, 1, 0, 0)),  # the batch script is no job step
    ],
)
def test_precedence(env: dict[str, str], expected: tuple[object, ...]) -> None:
    got = detect(env)
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.node_rank) == expected


def test_slurm_rendezvous_from_nodelist_and_job_id() -> None:
    got = detect(SRUN)
    assert got.master_addr == "gpu07"
    assert got.master_port == slurm_port(SRUN)
    other_job = detect({**SRUN, "SLURM_JOB_ID": "4243"})
    assert other_job.master_port != got.master_port
    other_step = detect({**SRUN, "SLURM_STEP_ID": "1"})
    assert other_step.master_port != got.master_port
    assert 15000 <= got.master_port < 55000


def test_slurm_overrides() -> None:
    got = detect({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (got.master_addr, got.master_port) == ("head", 1234)


def test_torchrun_addresses() -> None:
    got = detect(TORCHRUN)
    assert (got.master_addr, got.master_port) == ("10.0.0.1", 29400)


def test_mpi_without_address_agrees_over_mpi() -> None:
    got = detect(OMPI)
    assert got.master_addr is None and got.master_port is None


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node01", "node01"),
        ("gpu[07-09,12]", "gpu07"),
        ("gpu[07-09,12],cpu1", "gpu07"),
        ("cpu1,gpu[07-09]", "cpu1"),
        ("rack[1-2]-node[03-04]", "rack1-node03"),
        ("a-b.c[009]", "a-b.c009"),
    ],
)
def test_first_host(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_bad_integer_names_the_variable() -> None:
    with pytest.raises(DistLoadError, match="RANK='x'"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})
