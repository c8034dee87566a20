"""The loading methods the benchmark compares (each runs on every rank of a torchrun job).

Every method fills the same preallocated destinations -- the rank's tensor-parallel part of
every tensor, as a model materialised on an empty device would hold -- from the same
checkpoint, so their times, memory and storage reads compare like for like.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from distload.dtypes import to_torch
from distload.index import CheckpointIndex
from distload.plan import LoadPlan


@dataclass
class Context:
    """What every method gets: the checkpoint, the plan geometry and the destinations."""

    root: Path
    index: CheckpointIndex
    plan: LoadPlan  # the TP plan (only its layouts are used by the alternatives)
    placement: object  # the distload placement
    rank: int
    world: int
    wanted: dict[str, tuple[int, tuple[slice, ...]]]  # name -> (output index, local slices)
    dests: dict[str, torch.Tensor]
    staging_bytes: int
    phases: dict[str, float] = field(default_factory=dict)  # distload: this rank's phase times
    copies_per_byte: float | None = None  # distload: CPU copies per delivered byte (report)


def load_file(c: Context) -> None:
    """Every rank loads each whole shard (``safetensors.torch.load_file``), keeps its slices."""
    from safetensors.torch import load_file as st_load_file

    for f in c.index.files:
        shard = st_load_file(str(c.root / f.name))
        for name, t in shard.items():
            if name in c.wanted:
                c.dests[name].copy_(t[c.wanted[name][1]])
        del shard


def get_slice(c: Context) -> None:
    """Every rank reads only its slices (``safe_open(...).get_slice``: tp_plan, DCP)."""
    from safetensors import safe_open

    for f in c.index.files:
        with safe_open(str(c.root / f.name), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name in c.wanted:
                    c.dests[name].copy_(fh.get_slice(name)[c.wanted[name][1]])


def rank0_broadcast(c: Context) -> None:
    """Rank 0 loads every shard and broadcasts every tensor whole; ranks keep their slices
    (the DeepSpeed / FSDP ``broadcast_from_rank0`` path)."""
    from safetensors.torch import load_file as st_load_file

    for f in c.index.files:
        shard = st_load_file(str(c.root / f.name)) if c.rank == 0 else {}
        for meta in (t for t in c.index.tensors if t.file == f.name):
            if c.rank == 0:
                buf = shard[meta.name]
            else:
                buf = torch.empty(meta.shape, dtype=to_torch(meta.dtype))
            dist.broadcast(buf, 0)
            if meta.name in c.wanted:
                c.dests[meta.name].copy_(buf[c.wanted[meta.name][1]])
            del buf
        del shard


def dcp_hf(c: Context) -> None:
    """``torch.distributed.checkpoint.load`` with ``HuggingFaceStorageReader`` into DTensors
    whose local tensors are the destinations."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (c.world,))
    state = {}
    for name, (out, _) in c.wanted.items():
        layout = c.plan.layouts[out]
        shape = c.plan.outputs[out].shape
        spec = Shard(layout.dim) if layout.dim is not None and layout.chunks > 1 else Replicate()
        state[name] = DTensor.from_local(
            c.dests[name],
            mesh,
            [spec],
            run_check=False,
            shape=torch.Size(shape),
            stride=torch.empty(shape, device="meta").stride(),
        )
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(c.root)))
    for name, value in state.items():  # DCP may replace instead of writing in place
        local = value.to_local()
        if local.data_ptr() != c.dests[name].data_ptr():
            c.dests[name].copy_(local)


def fastsafetensors(c: Context) -> None:
    """fastsafetensors: each rank reads whole files (``SafeTensorsFileLoader``), then
    ``get_sharded``/``get_tensor`` scatter or broadcast over the process group."""
    from fastsafetensors import SafeTensorsFileLoader

    loader = SafeTensorsFileLoader(dist.group.WORLD, device="cpu", nogds=True)
    files = [str(c.root / f.name) for f in c.index.files]
    by_file = {f.name: [t for t in c.index.tensors if t.file == f.name] for f in c.index.files}
    try:
        for start in range(0, len(files), c.world):  # one file per rank at a time
            batch = files[start : start + c.world]
            loader.add_filenames({r: [path] for r, path in enumerate(batch)})
            fb = loader.copy_files_to_device()
            for path in batch:
                for meta in by_file[Path(path).name]:
                    out, _ = c.wanted[meta.name]
                    layout = c.plan.layouts[out]
                    if layout.dim is not None and layout.chunks > 1:
                        t = fb.get_sharded(meta.name, layout.dim)
                    else:
                        t = fb.get_tensor(meta.name)
                    c.dests[meta.name].copy_(t)
            fb.close()
            loader.reset()
    finally:
        loader.close()


def floor(c: Context) -> None:
    """Not an alternative users have: the cost of the bytes alone. Each rank reads its own
    parts straight from the files with one copy per byte and nothing else -- whole rows
    (row blocks, whole tensors) by ``preadv`` into the destination, column blocks copied out
    of a mapping of the file -- no coordination, no checks, no error handling across
    ranks. What a loader of one copy per byte can reach on this machine; the gap between it
    and a method is that method's own work."""
    import mmap
    import os

    from distload.storage import byte_view

    metas = {t.name: t for t in c.index.tensors}
    fds: dict[str, int] = {}
    maps: dict[str, tuple[mmap.mmap, torch.Tensor]] = {}
    try:
        for name, (_, box) in c.wanted.items():
            meta, dest = metas[name], c.dests[name]
            if meta.file not in fds:
                fds[meta.file] = os.open(c.root / meta.file, os.O_RDONLY)
            fd = fds[meta.file]
            rows = all(
                s.start == 0 and s.stop == n for s, n in zip(box[1:], meta.shape[1:], strict=True)
            )
            if rows:  # contiguous bytes of the file: read straight into the destination
                view, at = (
                    byte_view(dest),
                    meta.offset + (box[0].start if box else 0) * meta.row_bytes,
                )
                while len(view):
                    got = os.preadv(fd, [view], at)
                    if got <= 0:
                        raise OSError(f"{meta.file}: short read at {at} for {name}")
                    view, at = view[got:], at + got
                continue
            if meta.file not in maps:
                mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                maps[meta.file] = (mapping, torch.frombuffer(mapping, dtype=torch.uint8))
            stored = maps[meta.file][1][meta.offset : meta.offset + meta.nbytes]
            dest.copy_(stored.view(to_torch(meta.dtype)).view(meta.shape)[box])
            del stored
    finally:
        while maps:  # the tensor over a mapping goes first (it holds the mapping's buffer)
            _, (mapping, tensor) = maps.popitem()
            del tensor
            mapping.close()
        for fd in fds.values():
            os.close(fd)


def distload_load(c: Context) -> None:
    """distload: each byte read once, only slices moved, into ``out=``."""
    import distload

    state = distload.load(c.root, c.placement, out=c.dests, staging_bytes=c.staging_bytes)  # type: ignore[arg-type]
    c.phases.update(state.report.ranks[c.rank].seconds)
    c.copies_per_byte = state.report.cpu_copies_per_byte


METHODS: dict[str, Callable[[Context], None]] = {
    "load_file": load_file,
    "get_slice": get_slice,
    "rank0_broadcast": rank0_broadcast,
    "dcp_hf": dcp_hf,
    "fastsafetensors": fastsafetensors,
    "distload": distload_load,
    "floor": floor,
}


def available(name: str) -> bool:
    """Whether a method's package is installed here."""
    if name == "fastsafetensors":
        try:
            import fastsafetensors as _  # noqa: F401
        except ImportError:
            return False
    if name == "dcp_hf":
        try:
            from torch.distributed.checkpoint import HuggingFaceStorageReader as _r  # noqa: F401
        except ImportError:
            return False
    return True
