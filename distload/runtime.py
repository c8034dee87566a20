"""Runtime: who am I (rank, world size, local rank, device), and the process group to use.

Runs on every rank at the start of a load. Precedence:

1. an already initialised process group (the caller's ``group=`` or the world group) is used
   as it is and never re-initialised;
2. a torchrun / torchelastic environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
   ``MASTER_ADDR``, ``MASTER_PORT``) with ``WORLD_SIZE > 1``: the world group is initialised
   from it (``env://``), NCCL when the device is CUDA, gloo otherwise;
3. otherwise a single process: no process group at all.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distload.errors import DistLoadError
from distload.transport.base import Transport
from distload.transport.local import LocalTransport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """This process's place in the load's group."""

    rank: int  # rank within the group
    world_size: int  # size of the group
    local_rank: int  # index among the processes on this node
    device: torch.device  # where loaded tensors go by default
    launcher: str  # "process-group" | "torchrun" | "single"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistLoadError(f"environment variable {name}={value!r} is not an integer") from None


def default_device(local_rank: int) -> torch.device:
    """``cuda:{local_rank}`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(
    group: dist.ProcessGroup | None = None,
    device: str | torch.device | None = None,
    *,
    timeout: float = 300.0,
) -> tuple[Runtime, Transport]:
    """Find (or bootstrap) the process group and return the runtime and its transport."""
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        launcher = "process-group"
    elif group is not None:
        raise DistLoadError("group= was given but torch.distributed is not initialised")
    elif _env_int("WORLD_SIZE", 1) > 1:
        launcher = "torchrun"
        dev = torch.device(device) if device is not None else default_device(local_rank)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        log.info("initialising the process group from the environment (backend %s)", backend)
        dist.init_process_group(
            backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout)
        )
    else:
        dev = torch.device(device) if device is not None else default_device(local_rank)
        return Runtime(0, 1, local_rank, dev, "single"), LocalTransport(dev)

    from distload.transport.torch_dist import TorchDistTransport

    dev = torch.device(device) if device is not None else default_device(local_rank)
    backend = str(dist.get_backend(group)).lower()
    uses_nccl = "nccl" in backend and (dev.type == "cuda" or "gloo" not in backend)
    comm_device = (
        torch.device("cuda", torch.cuda.current_device()) if uses_nccl else torch.device("cpu")
    )
    transport = TorchDistTransport(group, comm_device, timeout)
    runtime = Runtime(transport.rank, transport.world_size, local_rank, dev, launcher)
    return runtime, transport
