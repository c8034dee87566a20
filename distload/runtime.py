"""Runtime: who am I (rank, world size, local rank, node), and the process group to use.

Runs on every rank at the start of a load. :func:`detect` maps the launcher's environment to
an :class:`Environment`; :func:`setup` turns it into a process group and a transport.
Precedence (first match wins):

1. an already initialised process group (the caller's ``group=`` or the world group) is used
   as it is and never re-initialised;
2. torchrun / torchelastic: ``RANK`` and ``WORLD_SIZE`` (and ``LOCAL_RANK``, ``GROUP_RANK``,
   ``MASTER_ADDR``, ``MASTER_PORT``). This wins over Slurm variables, so torchrun started by
   ``srun`` inside an allocation uses torchrun's worker ranks, not Slurm's task ranks;
3. a Slurm job step started by ``srun``: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (or
   ``SLURM_NTASKS``), ``SLURM_LOCALID``, ``SLURM_NODEID``; the rendezvous host is the first
   host of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` and the port is derived from the
   job and step ids so concurrent jobs do not collide (``MASTER_ADDR`` / ``MASTER_PORT``
   override both). A batch script itself (no job step) is not a distributed launch;
4. MPI: ``OMPI_COMM_WORLD_*`` (Open MPI), ``PMI_RANK`` / ``PMI_SIZE`` (MPICH, Intel MPI) or
   ``PMIX_RANK``; the rendezvous address is chosen by rank 0 and broadcast over MPI;
5. otherwise a single process, with no process group at all.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from distload.errors import DistLoadError, Failure, PeerError
from distload.transport.base import Transport
from distload.transport.local import LocalTransport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Environment:
    """What the launcher tells this process, before any process group exists."""

    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"
    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    master_addr: str | None  # rendezvous host (None: agree on one over MPI)
    master_port: int | None


@dataclass(frozen=True)
class Runtime:
    """This process's place in the load's group."""

    rank: int  # rank within the group
    world_size: int  # size of the group
    local_rank: int  # index among the processes on this node
    device: torch.device  # where loaded tensors go by default
    launcher: str  # "process-group" | "torchrun" | "slurm" | "mpi" | "single"


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise DistLoadError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise DistLoadError(f"environment variable {name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a Slurm hostlist: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``."""
    text = nodelist.strip()
    if not text:
        raise DistLoadError("empty Slurm node list")
    depth = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            text = text[:i]
            break
    match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", text)
    if match is None:
        return text
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0]
    rest = first_host(suffix) if "[" in suffix else suffix
    return f"{prefix}{first}{rest}"


def slurm_port(env: Mapping[str, str]) -> int:
    """A rendezvous port derived from the Slurm job and step ids, in 15000-32767: below
    Linux's ephemeral range (32768-60999), where other sockets of the node may hold it."""
    job = _int(env, "SLURM_JOB_ID", 0)
    step = _int(env, "SLURM_STEP_ID", _int(env, "SLURM_STEPID", 0))
    return 15000 + (job * 13 + step) % 17768


def detect(env: Mapping[str, str] | None = None) -> Environment:
    """The launcher environment of this process (pure: reads ``env``, starts nothing)."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT", 0) or None
    if "RANK" in env and "WORLD_SIZE" in env:
        return Environment(
            "torchrun",
            _int(env, "RANK"),
            _int(env, "WORLD_SIZE"),
            _int(env, "LOCAL_RANK", 0),
            _int(env, "GROUP_RANK", 0),
            addr,
            port,
        )
    step_tasks = env.get("SLURM_STEP_NUM_TASKS")
    if "SLURM_PROCID" in env and step_tasks:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        return Environment(
            "slurm",
            _int(env, "SLURM_PROCID"),
            int(step_tasks),
            _int(env, "SLURM_LOCALID", 0),
            _int(env, "SLURM_NODEID", 0),
            addr or (first_host(nodes) if nodes else "127.0.0.1"),
            port or slurm_port(env),
        )
    for rank_var, size_var, local_var in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
        ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ):
        if rank_var in env and size_var in env:
            return Environment(
                "mpi",
                _int(env, rank_var),
                _int(env, size_var),
                _int(env, local_var, 0),
                0,
                addr,
                port,
            )
    return Environment("single", 0, 1, _int(env, "LOCAL_RANK", 0), 0, addr, port)


def node_identity(env: Environment | None = None) -> str:
    """This process's node: ``DISTLOAD_NODE_ID`` if set, else host name and launcher node rank
    (so two simulated "nodes" of torchrun on one machine stay apart)."""
    override = os.environ.get("DISTLOAD_NODE_ID")
    if override:
        return override
    env = env or detect()
    return f"{socket.gethostname()}/{env.node_rank}"


def default_device(local_rank: int) -> torch.device:
    """``cuda:{local_rank}`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _mpi_rendezvous(env: Environment) -> tuple[str, int]:
    """Rank 0 picks host and port; MPI broadcasts them (runs on every MPI rank)."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistLoadError(
            "launched by MPI without MASTER_ADDR/MASTER_PORT: install mpi4py (pip install "
            "'distload[mpi]') so ranks can agree on a rendezvous address, or set both"
        ) from None
    comm = MPI.COMM_WORLD
    chosen = None
    if comm.Get_rank() == 0:
        host = env.master_addr or socket.gethostname()
        with socket.socket() as s:
            s.bind(("", 0))
            chosen = f"{host}:{env.master_port or s.getsockname()[1]}"
    text: str = comm.bcast(chosen, root=0)
    host, _, port = text.rpartition(":")
    return host, int(port)


def rendezvous_timeout(timeout: float) -> float:
    """Seconds every rank may take to join the process group: ``DISTLOAD_RENDEZVOUS_TIMEOUT``,
    else the load's timeout capped at 120 s (a rank that never starts is named sooner)."""
    override = os.environ.get("DISTLOAD_RENDEZVOUS_TIMEOUT")
    return float(override) if override else min(timeout, 120.0)


def _join_store(env: Environment, addr: str, port: int, wait: float) -> dist.Store:
    """Connect to (rank 0: host) the rendezvous store; a PeerError naming rank 0 and the
    address when it cannot be reached in ``wait`` seconds."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    # a launcher's store outlives restarts of the workers: keys of each attempt apart
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        tcp = dist.TCPStore(
            addr,
            port,
            env.world_size,
            is_master=env.rank == 0 and not agent,
            timeout=datetime.timedelta(seconds=wait),
            wait_for_workers=False,
        )
    except Exception as exc:
        raise PeerError(
            f"rank {env.rank}: runtime: cannot reach the rendezvous at {addr}:{port} "
            f"(hosted by {'the launcher' if agent else 'rank 0'}) within {wait:g} s: "
            f"{str(exc).splitlines()[0][:200]}",
            phase="runtime",
            failures=(Failure(0, "runtime", "PeerError", "rank 0 never opened the rendezvous"),),
        ) from None
    return dist.PrefixStore(f"/distload/attempt_{attempt}/", tcp)


def await_ranks(store: dist.Store, env: Environment, where: str, wait: float) -> None:
    """Every rank announces itself in ``store`` and waits for all the others; the ranks that
    do not join within ``wait`` seconds are named in a PeerError (raised on every rank that
    did join)."""
    key = "rendezvous/"
    store.set(f"{key}{env.rank}", socket.gethostname())
    deadline = time.monotonic() + wait
    missing = list(range(env.world_size))
    gone = ""
    while True:
        try:
            missing = [r for r in missing if not store.check([f"{key}{r}"])]
        except Exception:  # the host of the store (rank 0) gave up first and left
            gone = "; the rendezvous store closed meanwhile"
        if not missing:
            return
        if gone or time.monotonic() > deadline:
            raise PeerError(
                f"rank {env.rank}: runtime: rank(s) {missing} of {env.world_size} never joined "
                f"the process group at {where} within {wait:g} s (did they start? "
                f"DISTLOAD_RENDEZVOUS_TIMEOUT sets this wait){gone}",
                phase="runtime",
                failures=tuple(
                    Failure(r, "runtime", "PeerError", f"rank {r} never joined") for r in missing
                ),
            )
        time.sleep(0.05)


def init_process_group(env: Environment, device: torch.device, timeout: float) -> None:
    """Create the world process group for a detected launch (collective across the job):
    first every rank joins a store and the ranks that never do are named, then the group is
    made on that store."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    td = datetime.timedelta(seconds=timeout)
    log.info("initialising the process group (%s launch, backend %s)", env.launcher, backend)
    if env.launcher == "mpi" and (env.master_addr is None or env.master_port is None):
        addr, port = _mpi_rendezvous(env)
    else:
        addr, port = env.master_addr or "127.0.0.1", int(env.master_port or 29500)
    wait = rendezvous_timeout(timeout)
    store = _join_store(env, addr, port, wait)
    await_ranks(store, env, f"{addr}:{port}", wait)
    store.set_timeout(td)
    dist.init_process_group(
        backend=backend, store=store, rank=env.rank, world_size=env.world_size, timeout=td
    )


def _group_of(group: Any) -> Any:
    """``group=`` as a process group: a 1-d DeviceMesh stands for its group."""
    if type(group).__name__ != "DeviceMesh":
        return group
    if group.ndim != 1:
        names = getattr(group, "mesh_dim_names", None) or ()
        example = f"mesh[{names[-1]!r}]" if names else "mesh['tp']"
        raise DistLoadError(
            f"group= is a {group.ndim}-d DeviceMesh: pass one of its dimensions, e.g. {example}"
        )
    return group.get_group()


def setup(
    group: dist.ProcessGroup | None = None,
    device: str | torch.device | None = None,
    *,
    timeout: float = 300.0,
    transport: str = "auto",
) -> tuple[Runtime, Transport]:
    """Find (or bootstrap) the process group and return the runtime and its transport.

    ``transport="mpi"`` moves data with mpi4py over ``MPI.COMM_WORLD`` (or ``group`` when it
    is an mpi4py communicator) and creates no torch.distributed process group;
    ``"torch"``/``"auto"`` use torch.distributed.
    """
    if transport not in ("auto", "torch", "mpi"):
        raise DistLoadError(f"unknown transport {transport!r}; valid: 'auto', 'torch', 'mpi'")
    group = _group_of(group)
    env = detect()
    local_rank = env.local_rank
    dev = torch.device(device) if device is not None else default_device(local_rank)
    if transport == "mpi":
        try:
            from distload.transport.mpi import MPITransport
        except ImportError:
            raise DistLoadError(
                "transport='mpi' needs mpi4py (pip install 'distload[mpi]')"
            ) from None
        mpi = MPITransport(group, timeout)
        dev = torch.device(device) if device is not None else torch.device("cpu")  # CPU only
        if dev.type != "cpu":
            raise DistLoadError("the MPI transport loads into CPU memory; use device='cpu'")
        return Runtime(mpi.rank, mpi.world_size, local_rank, dev, "mpi"), mpi
    if dist.is_available() and dist.is_initialized():
        launcher = "process-group"
    elif group is not None:
        raise DistLoadError("group= was given but torch.distributed is not initialised")
    elif env.world_size > 1:
        launcher = env.launcher
        init_process_group(env, dev, timeout)
    else:
        return Runtime(0, 1, local_rank, dev, "single"), LocalTransport(dev)

    from distload.transport.torch_dist import TorchDistTransport

    backend = str(dist.get_backend(group)).lower()
    uses_nccl = "nccl" in backend and (dev.type == "cuda" or "gloo" not in backend)
    comm_device = (
        torch.device("cuda", torch.cuda.current_device()) if uses_nccl else torch.device("cpu")
    )
    net = TorchDistTransport(group, comm_device, timeout)
    return Runtime(net.rank, net.world_size, local_rank, dev, launcher), net
