"""A real single-node Slurm cluster for tests: munged, slurmctld and slurmd on loopback.

Needs root and Debian's slurm-wlm / munge packages (``.ci/run`` installs them). Everything
lives in one private folder: munge key and socket, state, spool, logs and ``slurm.conf``;
clients reach it through ``SLURM_CONF``. Daemons are stopped by their pids.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "sinfo")


def missing() -> str | None:
    """Why a cluster cannot be started here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root to run slurmd"
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"needs Debian's slurm-wlm and munge (missing: {', '.join(absent)})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`env` points clients at it."""

    def __init__(self, root: Path, cpus: int = 8) -> None:
        # the node is named after this host so that SLURM_JOB_NODELIST resolves
        self.root, self.cpus, self.node = root, cpus, socket.gethostname()
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.socket"
        self.pids: dict[str, Path] = {}

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _munge(self) -> None:
        mdir = self.root / "munge"
        mdir.mkdir(parents=True, exist_ok=True)
        os.chmod(mdir, 0o700)
        key = mdir / "munge.key"
        subprocess.run(
            [_bin("mungekey"), "--create", "--keyfile", str(key)],
            check=True,
            capture_output=True,
        )
        os.chmod(key, 0o600)
        pid = mdir / "munged.pid"
        subprocess.run(
            [
                _bin("munged"),
                "--force",
                f"--key-file={key}",
                f"--socket={self.socket}",
                f"--pid-file={pid}",
                f"--log-file={mdir / 'munged.log'}",
                f"--seed-file={mdir / 'munged.seed'}",
            ],
            check=True,
            capture_output=True,
        )
        self.pids["munged"] = pid

    def _write_conf(self) -> None:
        state, spool, logs = self.root / "state", self.root / "spool", self.root / "log"
        for d in (state, spool, logs):
            d.mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=distload",
            # job ids (and so rendezvous ports derived from them) differ between test clusters
            f"FirstJobId={random.randint(1000, 900000)}",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.socket}",
            "CryptoType=crypto/munge",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={logs / 'slurmctld.log'}",
            f"SlurmdLogFile={logs / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "SchedulerParameters=batch_sched_delay=0",
            "MinJobAge=5",
            "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "KillWait=5",
            "InactiveLimit=0",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._munge()
        self._write_conf()
        env = dict(os.environ, **self.env)
        subprocess.run(
            [_bin("slurmctld"), "-f", str(self.conf)],
            check=True,
            env=env,
            capture_output=True,
        )
        self.pids["slurmctld"] = self.root / "slurmctld.pid"
        subprocess.run(
            [_bin("slurmd"), "-f", str(self.conf), "-N", self.node],
            check=True,
            env=env,
            capture_output=True,
        )
        self.pids["slurmd"] = self.root / "slurmd.pid"
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%T"],
                check=False,
                env=env,
                capture_output=True,
                text=True,
            )
            state = out.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Slurm node did not become idle (state {state!r}); logs in {self.root}")

    def sbatch(
        self,
        script: Path,
        *args: str,
        output: Path,
        extra: list[str] | None = None,
        timeout: float = 240,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``sbatch --wait`` a script; returns the finished sbatch (its code is the job's)."""
        cmd = ["sbatch", "--wait", "-o", str(output), *(extra or []), str(script), *args]
        full_env = dict(os.environ, **self.env, **(env or {}))
        return subprocess.run(
            cmd, check=False, env=full_env, capture_output=True, text=True, timeout=timeout
        )

    def cancel_all(self, timeout: float = 20) -> None:
        """Cancel every job and wait until the queue is empty (no stray job steps)."""
        env = dict(os.environ, **self.env)
        subprocess.run(
            ["scancel", "--full", "--user", "root"], check=False, env=env, capture_output=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["squeue", "-h"], check=False, env=env, capture_output=True, text=True
            )
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        if "slurmctld" in self.pids:
            self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            path = self.pids.get(name)
            if path is None or not path.exists():
                continue
            try:
                pid = int(path.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
