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

import dataclasses
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from distload import runtime as runtime_mod
from distload.checkpoint import DEFAULT_MAX_HEADER_BYTES, read_checkpoint
from distload.coordination import agree, from_coordinator, gather_or_fail
from distload.dtypes import parse_dtype
from distload.errors import DistLoadError
from distload.execute import PREFETCH_DEPTH, Executor
from distload.gcpause import gc_paused
from distload.hub import download as hub_download
from distload.hub import options as hub_options_mod
from distload.hub.download import DownloadStats
from distload.hub.options import HubOptions
from distload.hub.plan import HubPlan
from distload.hub.remote import Resolved, read_hub_index
from distload.index import CheckpointIndex
from distload.manifest import load_digests
from distload.materialize import prepare_destinations
from distload.placement.base import Placement
from distload.placement.expert import EXPERT_PATTERN
from distload.plan import LoadPlan
from distload.planner import DEFAULT_BUCKET_BYTES, make_plan
from distload.report import LoadReport, RankReport
from distload.shm import ShmExchange
from distload.storage import DEFAULT_READ_THREADS, Arenas, FileReader
from distload.transforms import Transform, apply_transforms
from distload.transport.base import Transport

log = logging.getLogger(__name__)

_STAGING_ARENAS = PREFETCH_DEPTH + 2  # read ring + one receive + one pack buffer
# staging of the default bucket size (80 MiB): buckets are staging_bytes / _STAGING_ARENAS
DEFAULT_STAGING_BYTES = _STAGING_ARENAS * DEFAULT_BUCKET_BYTES


class LoadedState(dict[str, torch.Tensor]):
    """The tensors this rank loaded (name -> local piece), with the load's :attr:`report`."""

    report: LoadReport
    plan: LoadPlan
    rank: int  # this process's rank in the load's group
    files: dict[str, Path]  # Hub sources: local paths of the extra_files fetched
    root: Path  # folder of the checkpoint's files on this rank (Hub: its cache snapshot)
    all_max: Callable[[int], int]  # collective max over the group (e.g. to agree on a check)


def _tagged(phase: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; an exception leaves tagged with ``phase`` (for the error on every rank)."""
    try:
        return fn()
    except Exception as exc:
        exc.phase = phase  # type: ignore[attr-defined]
        raise


def _build_plan(
    index: CheckpointIndex,
    *,
    world_size: int,
    placement: Placement | None,
    dtype: str | None,
    bucket_bytes: int,
    readers: Collection[int] | None,
    names: Collection[str] | None,
    keys: Collection[str] | None = None,
    transforms: Sequence[Transform] = (),
    nodes: Sequence[int] = (),
    verify: bool | str | os.PathLike[str] = False,
    file_readers: Mapping[str, Collection[int]] | None = None,
) -> LoadPlan:
    """Coordinator step: the plan for an already validated ``index``."""
    digests = None
    if verify:
        digests = _tagged("index", lambda: load_digests(index, verify))
    produced = {v.name for v in _tagged("plan", lambda: apply_transforms(index, transforms))}
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
    plan = _tagged(
        "plan",
        lambda: make_plan(
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
            file_readers=file_readers,
        ),
    )
    every = os.environ.get("DISTLOAD_CHECK_EVERY")  # read here, on rank 0: one value for all
    if every is not None:
        plan = dataclasses.replace(plan, check_every=max(1, int(every)))
    return dataclasses.replace(plan, token=uuid.uuid4().hex)


def _use_shm(choice: bool | None, plan: LoadPlan, device: torch.device) -> bool:
    """Whether shared buckets go through shared memory (same decision on every rank)."""
    one_node = plan.world_size > 1 and len(set(plan.nodes)) == 1
    if choice is None:
        return one_node and device.type == "cpu"
    if choice and not (one_node and device.type == "cpu"):
        raise DistLoadError(
            "shm=True needs every rank on one node and a host-memory transport (gloo, MPI)",
            phase="materialize",
        )
    return choice


def _open_multicast(net: Transport, plan: LoadPlan, shm: bool) -> bool:
    """Open the sub-groups the plan multicasts to (all ranks; shared by one agreement).

    Not with shared memory (ranks copy their parts from the reader's slot) nor when
    ``DISTLOAD_MULTICAST=0``; False also where the transport cannot open groups (MPI, a load
    on a caller's sub-group): classes of receivers are then sent to member by member.
    """
    groups = plan.multicast_groups()
    if shm or not groups or os.environ.get("DISTLOAD_MULTICAST", "1") == "0":
        return False
    error: BaseException | None = None
    opened = False
    try:
        opened = net.open_groups(groups, "transfer: opening multicast groups")
    except Exception as exc:
        error = exc
    agree(net, "transfer", error)
    return opened


@gc_paused
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
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    hub_cache: str = "auto",
    extra_files: Sequence[str] = (),
    download_progress: Callable[[int, int], None] | None = None,
    shm: bool | None = None,
) -> LoadedState:
    """Load this rank's piece of every tensor of a safetensors checkpoint.

    Collective: every rank of ``group`` calls it with the same ``source``, ``placement``,
    ``dtype`` and sizes. Each checkpoint byte is read from storage by exactly one rank; the
    others get what they need over the process group.

    Args:
        source: folder with ``model.safetensors.index.json`` and shards, folder with one
            ``model.safetensors``, the path of one ``.safetensors`` file, or a Hugging Face
            Hub repository: ``"org/name"`` (when no such local path exists) or
            ``"hf://org/name@revision/subfolder"``.
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
            buffers). Buckets are ``staging_bytes / 5`` unless ``bucket_bytes`` is given.
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
        revision, subfolder: Hub sources: branch, tag or commit (default ``main``) and the
            folder holding the weights. Rank 0 pins the revision to one commit for the job.
        cache_dir, token, local_files_only: Hub cache folder (default ``HF_HUB_CACHE``),
            token (default: huggingface_hub's), and offline use of the cache (as
            ``HF_HUB_OFFLINE=1``): no request at all.
        hub_cache: ``"auto"`` finds which ranks share a cache folder (shared filesystem or
            node-local disks) with a probe file; ``"shared"``/``"node"`` say it. Each shard is
            downloaded by one rank of one cache and read only there.
        extra_files: names or patterns of small files to fetch as well (``"config.json"``);
            their local paths are in ``state.files``.
        download_progress: called on rank 0 as ``progress(bytes_done, bytes_total)`` during
            the download phase of a Hub source.
        shm: exchange shared buckets through shared memory (one read, each rank copies its
            parts) instead of the transport. Default: when every rank is on one node and the
            transport works in host memory (gloo, MPI). ``False`` forces the transport.

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
    hub_options = HubOptions(
        revision=revision,
        subfolder=subfolder,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        hub_cache=hub_cache,
        extra_files=tuple(extra_files),
    )

    def plan_for(index: CheckpointIndex, file_readers: Any = None) -> LoadPlan:
        return _build_plan(
            index,
            world_size=rt.world_size,
            placement=placement,
            dtype=target_dtype,
            bucket_bytes=bucket,
            readers=readers,
            names=names,
            keys=keys,
            transforms=transforms,
            nodes=nodes,
            verify=verify,
            file_readers=file_readers,
        )

    built: list[LoadPlan] = []  # rank 0: the plan it made for a local source

    def first_step() -> bytes:
        """Rank 0: a local source's plan (b"L"), or a Hub source pinned to a commit (b"H")."""
        resolved = _tagged("index", lambda: hub_options_mod.resolve_source(source, hub_options))
        if resolved is None:
            index = _tagged(
                "index",
                lambda: read_checkpoint(
                    source, max_header_bytes=max_header_bytes, allow_pickle=allow_pickle
                ),
            )
            plan = plan_for(index)
            built.append(plan)  # rank 0 keeps its plan: no JSON round trip for itself
            return b"L" + (plan.to_json() if rt.world_size > 1 else b"")
        if verify or allow_pickle:
            raise DistLoadError(
                "verify= and allow_pickle= apply to local sources; Hub files are checked "
                "against the Hub's sha256 when fetched, and only safetensors are fetched",
                phase="index",
            )
        info = {"resolved": resolved.to_json(), "token": uuid.uuid4().hex}
        return b"H" + json.dumps(info).encode()

    first = from_coordinator(net, "index", first_step)
    hub: HubPlan | None = None
    if first[:1] == b"H":
        info = json.loads(first[1:])
        resolved = Resolved.from_json(info["resolved"])
        domains = hub_options_mod.find_domains(net, hub_options, info["token"], nodes)

        def hub_step() -> bytes:
            index = _tagged(
                "index",
                lambda: read_hub_index(
                    hub_options.client(), resolved, max_header_bytes=max_header_bytes
                ),
            )
            hub_plan, allowed = _tagged(
                "plan",
                lambda: hub_options_mod.make_hub_plan(
                    index, resolved, domains, readers or range(rt.world_size), hub_options
                ),
            )
            plan = plan_for(index, allowed)
            return dataclasses.replace(plan, hub=hub_plan.to_json()).to_json()

        payload = from_coordinator(net, "plan", hub_step)
    else:
        payload = first[1:]
    dests: dict[int, torch.Tensor] = {}
    error: BaseException | None = None
    phase = "plan"  # a failure here is reported with the phase it happened in
    try:
        plan = built[0] if built and first[:1] == b"L" else LoadPlan.from_json(payload)
        hub = HubPlan.from_json(plan.hub) if plan.hub is not None else None
    except Exception as exc:
        error = exc
    if first[:1] == b"H":  # the download phase is collective: enter it only if all parsed
        agree(net, phase, error)
    seconds["plan"] = time.perf_counter() - tick
    root: str | os.PathLike[str] = plan.index.root if error is None else ""
    contain = None
    downloaded = DownloadStats()
    if hub is not None:
        reads = {
            hub.resolved.path(plan.tensors[item.tensor].file)
            for b in plan.buckets
            if b.reader == rt.rank
            for item in b.items
        }
        downloaded = hub_download.run_downloads(
            net,
            hub,
            reads,
            cache_dir=hub_options.cache,
            token=token,
            progress=download_progress if rt.rank == 0 else None,
        )
        seconds["download"] = downloaded.seconds
        root, contain = hub_download.local_root(hub, hub_options.cache)
    tick = time.perf_counter()
    exchange: ShmExchange | None = None
    if error is None:
        try:
            phase = "materialize"
            dests = prepare_destinations(plan, rt.rank, rt.device, out)
            if _use_shm(shm, plan, net.device):
                exchange = ShmExchange(plan, rt.rank, timeout=timeout)
        except Exception as exc:
            error = exc
    try:
        agree(net, phase, error)
        if exchange is not None:
            # every rank maps every slot now, then the files are removed: the mappings stay
            # valid and nothing is left in /dev/shm even if the whole job is killed later
            try:
                exchange.attach()
            except Exception as exc:
                error = exc
            agree(net, "materialize", error)
            exchange.unlink_own()
    except BaseException:
        if exchange is not None:
            exchange.close(purge=True)
        raise
    seconds["materialize"] = time.perf_counter() - tick

    tick = time.perf_counter()
    host = Arenas(torch.device("cpu"), pin=net.device.type == "cuda")
    comm = Arenas(net.device) if net.device.type == "cuda" else host
    total = len(plan.buckets)
    loaded_bytes = sum(
        plan.tensors[s].nbytes for s in sorted({link.stored for _, link in plan.links})
    )
    reader = FileReader(root, threads=read_threads, contain=contain)
    failed: BaseException | None = None
    try:
        multicast = _open_multicast(net, plan, exchange is not None)
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
            shm=exchange,
            multicast=multicast,
        )
        stats = executor.run()
        agree(net, "close", executor.pending)
        if rt.world_size == 1:
            exchange_mode = "none"
        elif exchange is not None:
            exchange_mode = "shared memory"
        elif multicast:
            exchange_mode = f"multicast ({len(plan.multicast_groups())} groups)"
        else:
            exchange_mode = "point to point"
    except BaseException as exc:
        failed = exc
        raise
    finally:
        reader.close()
        net.close_groups()
        if exchange is not None:
            shared = exchange.nbytes
            if failed is not None:  # peers waiting on this rank stop waiting, blame the same
                blamed = failed.ranks if isinstance(failed, DistLoadError) else ()
                exchange.abort(blamed)
            # after a failure a peer may be dead: survivors also remove its shared-memory files
            exchange.close(purge=failed is not None)
    staging = host.nbytes + (comm.nbytes if comm is not host else 0)
    if exchange is not None:
        staging += shared
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
        bytes_downloaded=downloaded.bytes_downloaded,
        shared_buckets=stats.buckets,
    )
    reports = [RankReport.from_json(b) for b in gather_or_fail(net, "close", mine.to_json)]
    state = LoadedState((names_by_index[t], d) for t, d in dests.items())
    state.plan = plan
    state.rank = rt.rank
    state.root = Path(root)
    state.files = hub_download.extra_paths(hub, hub_options.cache) if hub is not None else {}
    state.all_max = lambda value: net.all_reduce_max(value, "after load: agreement")
    state.report = LoadReport(
        source=hub.resolved.ref.url() if hub is not None else str(source),
        commit=hub.resolved.commit if hub is not None else None,
        hub_cache=hub.mode if hub is not None else None,
        world_size=rt.world_size,
        total_bytes=loaded_bytes,
        tensors=len(plan.outputs),
        buckets=total,
        placement=plan.placement,
        exchange=exchange_mode,
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
            f" (pass strict=False to load the rest){_fused_hint(missing, state.plan.skipped)}",
            tensor=missing[0],
        )
    if missing:
        log.warning("checkpoint lacks %d model tensor(s): %s", len(missing), missing[:8])
    return LoadIntoResult(sorted(missing), sorted(state.plan.skipped), state.report)


def _fused_hint(missing: Sequence[str], skipped: Sequence[str]) -> str:
    """Advice when the model holds fused expert parameters and the checkpoint has one tensor
    per expert (transformers' MoE models and the Hub's checkpoints of them)."""
    fused = any(n.endswith((".experts.gate_up_proj", ".experts.down_proj")) for n in missing)
    if fused and any(re.search(EXPERT_PATTERN, n) for n in skipped):
        return (
            "; the model holds fused expert parameters (experts.gate_up_proj / down_proj) and "
            "the checkpoint one tensor per expert: pass transforms=distload.fused_experts() "
            "(Mixtral: distload.preset_transforms('mixtral_fused'))"
        )
    return ""


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
