"""``distload.load``: the one orchestrator of the load phases.

Every rank of the group calls :func:`load` with the same arguments (``out=`` and ``device``
may differ per rank). Phases, in order, on every rank:

1. runtime -- find or bootstrap the process group (``distload.runtime``);
2. index + plan -- on rank 0 only: read and validate the checkpoint's index and headers, run
   the placement and the planner; the plan (JSON, no pickle) is broadcast to all ranks;
3. materialize -- each rank allocates or checks its destination tensors; all ranks agree;
4. read / transfer -- the executor runs the plan bucket by bucket;
5. close -- all ranks agree on success and exchange their figures for the report.

A failure in any phase on any rank raises the same :class:`~distload.errors.DistLoadError` on
every rank.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from distload import runtime as runtime_mod
from distload.checkpoint import DEFAULT_MAX_HEADER_BYTES, read_checkpoint
from distload.coordination import agree, from_coordinator, gather_or_fail
from distload.dtypes import parse_dtype
from distload.errors import DistLoadError
from distload.execute import PREFETCH_DEPTH, Executor
from distload.manifest import load_digests
from distload.materialize import prepare_destinations
from distload.placement.base import Placement
from distload.plan import LoadPlan
from distload.planner import make_plan
from distload.report import LoadReport, RankReport
from distload.storage import DEFAULT_READ_THREADS, Arenas, FileReader
from distload.transforms import Transform, apply_transforms

log = logging.getLogger(__name__)

DEFAULT_STAGING_BYTES = 256 * 1024 * 1024
_STAGING_ARENAS = PREFETCH_DEPTH + 2  # read ring + one receive + one pack buffer


class LoadedState(dict[str, torch.Tensor]):
    """The tensors this rank loaded (name -> local piece), with the load's :attr:`report`."""

    report: LoadReport
    plan: LoadPlan
    rank: int  # this process's rank in the load's group
    all_max: Callable[[int], int]  # collective max over the group (e.g. to agree on a check)


def _build_plan(
    source: str | os.PathLike[str],
    *,
    world_size: int,
    placement: Placement | None,
    dtype: str | None,
    bucket_bytes: int,
    readers: Collection[int] | None,
    names: Collection[str] | None,
    max_header_bytes: int,
    keys: Collection[str] | None = None,
    transforms: Sequence[Transform] = (),
    nodes: Sequence[int] = (),
    verify: bool | str | os.PathLike[str] = False,
    allow_pickle: bool = False,
) -> bytes:
    """Coordinator step: index + plan, serialised for broadcast."""
    try:
        index = read_checkpoint(
            source, max_header_bytes=max_header_bytes, allow_pickle=allow_pickle
        )
    except Exception as exc:
        exc.phase = "index"  # type: ignore[attr-defined]
        raise
    digests = None
    if verify:
        try:
            digests = load_digests(index, verify)
        except DistLoadError as exc:
            exc.phase = "index"
            raise
    try:
        produced = {v.name for v in apply_transforms(index, transforms)}
    except DistLoadError as exc:
        exc.phase = "plan"
        raise
    if keys is not None:
        names = sorted(set(keys) & produced)
    elif names is not None:
        missing = sorted(set(names) - produced)
        if missing:
            raise DistLoadError(
                f"out= names {len(missing)} tensor(s) not in the checkpoint: {missing[:5]}",
                tensor=missing[0],
                phase="plan",
            )
    try:
        plan = make_plan(
            index,
            world_size,
            placement,
            dtype=dtype,
            bucket_bytes=bucket_bytes,
            readers=readers,
            names=names,
            transforms=transforms,
            nodes=nodes,
            digests=digests,
        )
    except Exception as exc:
        exc.phase = "plan"  # type: ignore[attr-defined]
        raise
    return plan.to_json()


def load(
    source: str | os.PathLike[str],
    placement: Placement | None = None,
    *,
    dtype: Any = None,
    device: str | torch.device | None = None,
    out: Mapping[str, torch.Tensor] | None = None,
    group: dist.ProcessGroup | None = None,
    staging_bytes: int = DEFAULT_STAGING_BYTES,
    bucket_bytes: int | None = None,
    readers: Collection[int] | None = None,
    timeout: float = 300.0,
    read_threads: int = DEFAULT_READ_THREADS,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    progress: Callable[[int, int], None] | None = None,
    keys: Collection[str] | None = None,
    transforms: Sequence[Transform] = (),
    transport: str = "auto",
    verify: bool | str | os.PathLike[str] = False,
    allow_pickle: bool = False,
) -> LoadedState:
    """Load this rank's piece of every tensor of a safetensors checkpoint.

    Collective: every rank of ``group`` calls it with the same ``source``, ``placement``,
    ``dtype`` and sizes. Each checkpoint byte is read from storage by exactly one rank; the
    others get what they need over the process group.

    Args:
        source: folder with ``model.safetensors.index.json`` and shards, folder with one
            ``model.safetensors``, or the path of one ``.safetensors`` file.
        placement: how tensors lie over the ranks, e.g. ``distload.TensorParallel(rules)``.
            Default: every rank gets every tensor.
        dtype: ``None``/``"auto"`` keeps stored dtypes; a floating ``torch.dtype`` casts the
            floating tensors (integer and bool tensors are never cast). The cast happens on the
            side that moves fewer bytes.
        device: where the tensors go (default ``cuda:{LOCAL_RANK}`` with CUDA, else ``cpu``).
        out: name -> preallocated tensor of this rank's local shape. Only these tensors are
            loaded, written in place; nothing else is allocated.
        group: process group (default: the world group, initialised from the launcher's
            environment if needed -- torchrun, srun, mpirun; a single process needs none).
            With ``transport="mpi"``, an mpi4py communicator (default ``COMM_WORLD``).
        verify: check every byte read against an integrity manifest while reading (no second
            pass): ``True`` uses ``SOURCE/distload.manifest.json``, a path names another one
            (written by ``distload manifest``). A mismatch fails the load on every rank.
        allow_pickle: also accept PyTorch ``.bin``/``.pt`` (zip) checkpoints. Only their
            metadata is unpickled, with torch's weights-only unpickler; tensor bytes are read
            like safetensors data. Off by default: pickles can run code.
        transport: ``"auto"``/``"torch"`` (torch.distributed: NCCL for CUDA, gloo for CPU) or
            ``"mpi"`` (mpi4py, CPU only, no torch.distributed process group).
        staging_bytes: bound on this rank's staging memory (read ring, receive and pack
            buffers). Buckets are ``staging_bytes / 4`` unless ``bucket_bytes`` is given.
        readers: ranks allowed to read from storage (default: all).
        timeout: seconds any rank waits for a peer before failing with a clear error.
        read_threads: positioned reads in flight per reader rank.
        progress: called on rank 0 as ``progress(done_buckets, total_buckets)``.
        keys: load only these tensor names (names absent from the checkpoint are ignored;
            ``state.plan.skipped`` lists the checkpoint tensors not loaded).
        transforms: key transforms applied to the checkpoint's names and layouts before
            placement (``distload.Rename``, ``Split``, ``Merge``, ``Transpose``); placements,
            ``out`` and the result use the transformed names. Each stored byte is still read
            once, and each rank receives only its regions of each transformed tensor.

    Returns:
        :class:`LoadedState`: a dict of this rank's tensors, plus ``.report`` (per-rank bytes
        read/sent/received/held, staging peak, seconds per phase) and ``.plan``.

    Example:
        >>> import distload                                       # doctest: +SKIP
        >>> state = distload.load("ckpt/", distload.TensorParallel({"*.q_proj.weight": "colwise"}))
        >>> print(state.report.table())
    """
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    target_dtype = parse_dtype(dtype)
    if staging_bytes < _STAGING_ARENAS:
        raise DistLoadError(f"staging_bytes must be >= {_STAGING_ARENAS}, got {staging_bytes}")
    bucket = bucket_bytes or max(1, staging_bytes // _STAGING_ARENAS)
    rt, net = runtime_mod.setup(group, device, timeout=timeout, transport=transport)
    nodes = runtime_mod.topology(net)
    seconds["runtime"] = time.perf_counter() - t0

    tick = time.perf_counter()
    names = sorted(out) if out is not None else None
    payload = from_coordinator(
        net,
        "index",
        lambda: _build_plan(
            source,
            world_size=rt.world_size,
            placement=placement,
            dtype=target_dtype,
            bucket_bytes=bucket,
            readers=readers,
            names=names,
            max_header_bytes=max_header_bytes,
            keys=keys,
            transforms=transforms,
            nodes=nodes,
            verify=verify,
            allow_pickle=allow_pickle,
        ),
    )
    dests: dict[int, torch.Tensor] = {}
    error: BaseException | None = None
    phase = "plan"  # a failure here is reported with the phase it happened in
    try:
        plan = LoadPlan.from_json(payload)
        seconds["plan"] = time.perf_counter() - tick
        tick = time.perf_counter()
        phase = "materialize"
        dests = prepare_destinations(plan, rt.rank, rt.device, out)
    except Exception as exc:
        error = exc
    agree(net, phase, error)
    seconds["materialize"] = time.perf_counter() - tick

    tick = time.perf_counter()
    host = Arenas(torch.device("cpu"), pin=net.device.type == "cuda")
    comm = Arenas(net.device) if net.device.type == "cuda" else host
    total = len(plan.buckets)
    loaded_bytes = sum(
        plan.tensors[s].nbytes for s in sorted({link.stored for _, link in plan.links})
    )
    reader = FileReader(plan.index.root, threads=read_threads)
    try:
        executor = Executor(
            plan,
            net,
            dests,
            reader,
            host_arenas=host,
            comm_arenas=comm,
            on_bucket=(lambda n: progress(n + 1, total))
            if progress is not None and rt.rank == 0
            else None,
        )
        stats = executor.run()
        agree(net, "close", executor.pending)
    finally:
        reader.close()
    staging = host.nbytes + (comm.nbytes if comm is not host else 0)
    host.clear()
    comm.clear()
    seconds["read"] = stats.read_seconds
    seconds["transfer"] = stats.transfer_seconds
    seconds["execute"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - t0

    names_by_index = {t: plan.outputs[t].name for t in dests}
    mine = RankReport(
        rank=rt.rank,
        bytes_read=stats.bytes_read,
        bytes_sent=stats.bytes_sent,
        bytes_received=stats.bytes_received,
        bytes_held=sum(d.numel() * d.element_size() for d in dests.values()),
        peak_staging_bytes=staging,
        seconds=seconds,
    )
    reports = [RankReport.from_json(b) for b in gather_or_fail(net, "close", mine.to_json)]
    state = LoadedState((names_by_index[t], d) for t, d in dests.items())
    state.plan = plan
    state.rank = rt.rank
    state.all_max = lambda value: net.all_reduce_max(value, "after load: agreement")
    state.report = LoadReport(
        source=str(source),
        world_size=rt.world_size,
        total_bytes=loaded_bytes,
        tensors=len(plan.outputs),
        buckets=total,
        placement=plan.placement,
        nodes=len(set(plan.nodes)) or 1,
        ranks=reports,
        wall_seconds=max(r.seconds.get("total", 0.0) for r in reports),
    )
    log.info(
        "loaded %d tensors (%d bytes held) on rank %d in %.2f s",
        len(state),
        mine.bytes_held,
        rt.rank,
        seconds["total"],
    )
    return state


class LoadIntoResult(NamedTuple):
    """What :func:`load_into` did, shaped like ``load_state_dict``'s return value."""

    missing_keys: list[str]  # model tensors the checkpoint does not have (still meta)
    unexpected_keys: list[str]  # checkpoint tensors the model does not have (not read)
    report: LoadReport


def load_into(
    model: torch.nn.Module,
    source: str | os.PathLike[str],
    placement: Placement | None = None,
    *,
    strict: bool = True,
    dtype: Any = None,
    device: str | torch.device | None = None,
    group: dist.ProcessGroup | None = None,
    transforms: Sequence[Transform] = (),
    as_dtensor: bool = False,
    **kwargs: Any,
) -> LoadIntoResult:
    """Materialise a meta-device model's parameters and buffers straight from a checkpoint.

    Collective, like :func:`load`. Each rank's received tensors *become* the model's
    parameters (no random init, no second copy), on ``device``. Tied weights stay tied (one
    Parameter for all their names; the checkpoint may hold any one of them), including ties a
    transformers model declares in ``_tied_weights_keys`` but has not applied yet. When the model's
    parameters are already DTensors (built on meta and parallelised with ``parallelize_module``
    or ``fully_shard``) and no ``placement`` is given, each rank loads exactly its shard and
    the parameters stay DTensors with the same mesh and placements.

    Args:
        strict: raise if the model has tensors the checkpoint lacks (else they are reported in
            ``missing_keys`` and stay as they are). Unexpected checkpoint tensors are never read.
        dtype: ``None``/``"auto"`` keeps each stored dtype; a floating dtype casts floating
            tensors only (integer and bool buffers keep theirs).
        as_dtensor: with a :class:`~distload.TensorParallel` placement, make parameters
            DTensors on a ``(dp, tp)`` DeviceMesh over the world (``Shard(dim)`` or
            ``Replicate()`` on ``tp``, ``Replicate()`` on ``dp``). Models whose parameters are
            already DTensors keep theirs without this flag.
        transforms: key transforms mapping checkpoint names and layouts onto the model's
            (e.g. split a fused ``qkv``, transpose GPT-2 Conv1D weights).
        kwargs: passed to :func:`load` (``staging_bytes``, ``timeout``, ...).

    Returns:
        ``(missing_keys, unexpected_keys, report)``.

    Buffers the checkpoint does not hold keep their value when real (build the model with
    ``accelerate.init_empty_weights()``, which keeps buffers real); meta buffers that the
    checkpoint does not hold are an error naming them, never left silently unset.
    """
    from distload.materialize import (
        as_dtensor_like,
        assign,
        declared_ties,
        dtensor_from_layout,
        model_entries,
        tie_groups,
        tp_mesh,
    )
    from distload.placement.from_model import FromModel, mesh_specs_of
    from distload.placement.tensor_parallel import TensorParallel

    entries = model_entries(model)
    groups = tie_groups(entries, declared_ties(model))
    if as_dtensor and not isinstance(placement, TensorParallel):
        raise DistLoadError(
            "as_dtensor=True needs a TensorParallel placement (models whose parameters are "
            "already DTensors are loaded as DTensors without it)"
        )
    if as_dtensor and (group is not None or not dist.is_initialized()):
        raise DistLoadError("as_dtensor=True needs an initialised world process group")
    if placement is None:
        group_rank_of = None
        if group is not None:
            group_rank_of = {
                g: dist.get_group_rank(group, g) for g in dist.get_process_group_ranks(group)
            }
        specs = mesh_specs_of({n: e.tensor for n, e in entries.items()}, group_rank_of)
        if specs:
            placement = FromModel(specs)
    state = load(
        source,
        placement,
        dtype=dtype,
        device=device,
        group=group,
        keys=list(entries),
        transforms=transforms,
        **kwargs,
    )
    position = {t.name: i for i, t in enumerate(state.plan.outputs)}
    missing: list[str] = []
    mesh = None
    if as_dtensor:  # collective: every rank builds the mesh here, in the same order
        size = placement.size or dist.get_world_size()  # type: ignore[union-attr]
        device_type = next(iter(state.values())).device.type if state else "cpu"
        mesh = tp_mesh(device_type, dist.get_world_size(), size)
    for names in groups:
        source_name = next((n for n in names if n in position), None)
        if source_name is None:
            entry = entries[names[0]]
            if entry.is_param or entry.persistent:
                missing.extend(names)
            continue
        value = state.get(source_name)
        if value is None:  # placed on other ranks (pipeline, device map): stays meta here
            continue
        like = entries[names[0]].tensor
        stored = state.plan.outputs[position[source_name]].shape
        if like.is_meta and tuple(like.shape) != tuple(stored):
            raise DistLoadError(
                f"model tensor {names[0]!r} has shape {list(like.shape)} but the checkpoint's "
                f"{source_name!r} has {list(stored)}",
                tensor=names[0],
            )
        if _is_dtensor(like):
            value = as_dtensor_like(value, like)
        elif mesh is not None:
            out = position[source_name]
            value = dtensor_from_layout(
                value, mesh, state.plan.layouts[out], state.plan.outputs[out].shape
            )
        assign(entries, names, value)
    stale = sorted(
        n for n, e in entries.items() if not e.is_param and not e.persistent and e.tensor.is_meta
    )
    if stale:
        raise DistLoadError(
            f"{len(stale)} non-persistent buffer(s) are on the meta device and not in the "
            f"checkpoint: {stale[:5]}; build the model with accelerate.init_empty_weights() "
            "(which keeps buffers real) or initialise them before loading",
            tensor=stale[0],
        )
    if missing and strict:
        raise DistLoadError(
            f"checkpoint {source} lacks {len(missing)} tensor(s) of the model: {missing[:8]}"
            " (pass strict=False to load the rest)",
            tensor=missing[0],
        )
    if missing:
        log.warning("checkpoint lacks %d model tensor(s): %s", len(missing), missing[:8])
    return LoadIntoResult(sorted(missing), sorted(state.plan.skipped), state.report)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
