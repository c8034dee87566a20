"""``distload.load`` and ``distload.load_into``: each a short list of the load's phases.

Every rank of the group calls :func:`load` with the same arguments (``out=`` and ``device``
may differ per rank). Phases, in order, on every rank (``../DESIGN.md``):

1. runtime -- find or bootstrap the process group (``distload.runtime``);
2. index + plan -- rank 0 reads and validates the source, runs the placement and the
   planner; every rank receives the plan (``distload.source``);
3. download -- Hub sources only: each shard is fetched by one rank of one cache;
4. materialize -- each rank allocates or checks its destinations; all ranks agree;
5. execute -- read, transfer and copy bucket by bucket (``distload.execute``);
6. close -- all ranks agree on success and exchange their figures for the report.

A failure in any phase on any rank raises the same :class:`~distload.errors.DistLoadError` on
every rank.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from distload import runtime as runtime_mod
from distload.agreement import agree_on_arguments
from distload.checkpoint import DEFAULT_MAX_HEADER_BYTES
from distload.execute import ExecResult, ExecutePhase
from distload.gcpause import gc_paused
from distload.geometry import piece_bytes
from distload.materialize import (
    bind,
    check_bound,
    check_dtensor_request,
    declared_ties,
    destinations,
    dtensor_outputs,
    model_entries,
    parallelize,
    placement_of_dtensors,
    tie_groups,
)
from distload.options import DEFAULT_STAGING_BYTES, LoadOptions, Progress, check_arguments
from distload.placement.base import Placement
from distload.placement.device_map import DeviceMap
from distload.plan import LoadPlan
from distload.planner import output_metas
from distload.report import LoadFacts, LoadReport, PhaseClock, RankReport, load_report
from distload.residency import node_leaders, node_report
from distload.source import Coordinator, Fetched, agree_on_plan, fetch
from distload.storage import DEFAULT_READ_THREADS
from distload.transforms import Transform
from distload.transport.base import Transport

__all__ = ["DEFAULT_STAGING_BYTES", "LoadIntoResult", "LoadedState", "load", "load_into"]

log = logging.getLogger(__name__)


class LoadedState(dict[str, torch.Tensor]):
    """The tensors this rank loaded (name -> local piece), with the load's :attr:`report`."""

    report: LoadReport
    plan: LoadPlan
    rank: int  # this process's rank in the load's group
    files: dict[str, Path]  # Hub sources: local paths of the extra_files fetched
    root: Path  # folder of the checkpoint's files on this rank (Hub: its cache snapshot)
    all_max: Callable[[int], int]  # collective max over the group (e.g. to agree on a check)


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
    direct_io: bool = True,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    progress: Progress | None = None,
    keys: Collection[str] | None = None,
    transforms: Sequence[Transform] = (),
    transport: str = "auto",
    verify: bool | str | os.PathLike[str] = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    hub_cache: str = "auto",
    extra_files: Sequence[str] = (),
    download_progress: Progress | None = None,
    shm: bool | None = None,
) -> LoadedState:
    """Load this rank's piece of every tensor of a safetensors checkpoint.

    Collective: every rank of ``group`` calls it with the same arguments (``out`` and
    ``device`` may differ). Each checkpoint byte is read from storage by exactly one rank; the
    others get what they need over the process group.

    Args:
        source: a folder (an index and shards, or one ``model.safetensors``), one file, or a
            Hub repository (``"org/name"`` if no such path exists, ``"hf://org/name@rev/sub"``).
        placement: how tensors lie over the ranks (``distload.TensorParallel(rules)``,
            ``PipelineParallel``, ``DeviceMap``, ``Mesh`` ...); default: all on every rank.
        dtype: ``None``/``"auto"`` keeps stored dtypes; a floating dtype casts floating
            tensors (never integer or bool ones), on the side that moves fewer bytes.
        device: where tensors go (default ``cuda:{LOCAL_RANK}`` with CUDA, else ``cpu``).
        out: name -> preallocated tensor of this rank's local shape: only these are loaded,
            in place. group: the process group (default: the world, initialised from
            torchrun / srun / mpirun if needed; with ``transport="mpi"`` a communicator).
        keys, transforms: load only these names (absent ones ignored); key transforms
            (``Rename``, ``Split``, ``Merge``, ``Stack``, ``Transpose``), applied first.
        staging_bytes, bucket_bytes, readers, read_threads, timeout, max_header_bytes,
            direct_io: the staging bound per rank (buckets of a sixth of it), the ranks allowed
            to read, reads in flight per reader, seconds to wait for a peer, the header size
            limit; read blocks the page cache lacks with ``O_DIRECT`` (``False``: buffered).
        verify: check each byte against a manifest while reading (``True``: the one in the
            source; a path: another). allow_pickle: also read ``.bin``/``.pt`` zip checkpoints
            (weights-only unpickler, metadata only). transport: ``"auto"``/``"torch"`` or
            ``"mpi"``. shm: shared buckets through same-node shared memory (default: when
            all ranks are on one node with a host-memory transport).
        progress: ``progress(done_bytes, total_bytes)`` on rank 0 as buckets finish (bytes
            moved); ``download_progress``: the same for the download phase of a Hub source.
        variant: load ``model.{variant}.safetensors`` or its index (weight variants such as
            ``"fp16"``, as transformers saves them).
        revision, subfolder, cache_dir, token, local_files_only, hub_cache, extra_files: Hub
            sources (:class:`~distload.hub.options.HubOptions`): rank 0 pins the revision to
            one commit; each shard is downloaded by one rank of one cache; ``extra_files``
            (e.g. ``"config.json"``) land in ``state.files``.

    Returns:
        :class:`LoadedState`: a dict of this rank's tensors, with ``.report`` (bytes read,
        sent, received and held per rank, staging peak, seconds per phase) and ``.plan``.

    Example:
        >>> import distload                                       # doctest: +SKIP
        >>> state = distload.load("ckpt/", distload.TensorParallel({"*.q_proj.weight": "colwise"}))
        >>> print(state.report.table())
    """
    options = LoadOptions.from_arguments(locals())
    return run_load(source, placement, options, device=device, out=out, group=group)


def run_load(
    source: str | os.PathLike[str],
    placement: Placement | None,
    options: LoadOptions,
    *,
    device: str | torch.device | None,
    out: Mapping[str, torch.Tensor] | None,
    group: Any,
) -> LoadedState:
    """The phases of :func:`load`, in order (collective: every rank of the group)."""
    check_arguments(placement, out, device)
    out, dtensors = dtensor_outputs(out)  # DTensors: loaded into their local tensors
    clock = PhaseClock()
    rt, net = runtime_mod.setup(group, device, timeout=options.timeout, transport=options.transport)
    if dtensors and placement is None:  # the shards the DTensors hold
        placement = placement_of_dtensors(dtensors, group)
    clock.lap("runtime")
    agreed = agree_on_arguments(
        net,
        _arguments(source, placement, options),
        out,
        node=runtime_mod.node_identity(),
        report=(lambda nodes: node_report(source, net.rank, nodes))
        if net.device.type == "cpu"
        else None,
    )
    nodes = agreed.nodes
    coordinator = Coordinator(
        source,
        placement,
        options,
        world_size=rt.world_size,
        nodes=nodes,
        names=agreed.names,
        resident=[agreed.reports[r] for r in node_leaders(nodes).values()],
    )
    plan = agree_on_plan(net, coordinator, nodes)
    clock.lap("plan")
    fetched = fetch(net, plan, options)
    if plan.hub is not None:
        clock.lap("download")
    delivered: dict[int, torch.Tensor] = {}
    with ExecutePhase(plan, net, shm=options.shm, timeout=options.timeout) as phase:
        dests = phase.materialize(lambda: destinations(plan, rt.rank, rt.device, out, dtensors))
        clock.lap("materialize")
        on_bucket = _on_bucket(options.progress, rt.rank, plan)
        result = phase.run(
            dests.tensors,
            root=fetched.root,
            contain=fetched.contain,
            read_threads=options.read_threads,
            direct_io=options.direct_io,
            on_bucket=on_bucket,
            after=lambda: dests.check_ties(plan, rt.rank),
        )
        clock.lap("execute")
        clock.record("read", result.stats.read_seconds)  # inside execute: read-ahead thread
        clock.record("transfer", result.stats.transfer_seconds)

        def report() -> bytes:
            delivered.update(dests.result())  # output -> the tensor the caller gets (ties)
            return _rank_report(rt.rank, delivered, result, fetched, clock=clock, net=net).to_json()

        # the closing step: every rank's report, or the same error on every rank
        ranks = [RankReport.from_json(b) for b in phase.close(result, report)]
    mine = ranks[net.rank]
    state = LoadedState((plan.outputs[t].name, d) for t, d in delivered.items())
    state.plan, state.rank, state.root, state.files = plan, rt.rank, fetched.root, fetched.files
    state.all_max = lambda value: net.all_reduce_max(value, "after load: agreement")
    state.report = load_report(LoadFacts.of(plan, str(source), result.exchange), ranks)
    log.info(
        "loaded %d tensors (%d bytes held) on rank %d in %.2f s",
        len(state),
        mine.bytes_held,
        rt.rank,
        mine.seconds["total"],
    )
    return state


def _arguments(
    source: str | os.PathLike[str], placement: Placement | None, options: LoadOptions
) -> dict[str, Any]:
    """The arguments every rank must agree on (``distload.agreement``)."""
    hub = options.hub
    return {
        "source": os.fspath(source),
        "placement": placement,
        "dtype": options.dtype,
        "transforms": options.transforms,
        "keys": sorted(options.keys) if options.keys is not None else None,
        "readers": sorted(options.readers) if options.readers is not None else None,
        "transport": options.transport,
        "shm": options.shm,
        "verify": options.verify,
        "allow_pickle": options.allow_pickle,
        "hub": [hub.revision, hub.subfolder, hub.hub_cache, list(hub.extra_files)],
        "variant": hub.variant,
    }


def _on_bucket(
    progress: Progress | None, rank: int, plan: LoadPlan
) -> Callable[[int], None] | None:
    """The per-bucket callback: ``progress(done_bytes, total_bytes)`` on rank 0, in bytes of
    the checkpoint moved (each bucket counts when it is done)."""
    if progress is None or rank != 0:
        return None
    tensors = plan.index.tensors
    done = list(
        itertools.accumulate(
            sum(piece_bytes(tensors[i.tensor], i) for i in b.items) for b in plan.buckets
        )
    )
    total = done[-1] if done else 0
    return lambda number: progress(done[number], total)


def _rank_report(
    rank: int,
    dests: Mapping[int, torch.Tensor],
    result: ExecResult,
    fetched: Fetched,
    *,
    clock: PhaseClock,
    net: Transport,
) -> RankReport:
    """This rank's figures, made once its bytes are in (the clock stops here; ``net`` has
    waited on every operation but the closing exchange of reports)."""
    stats = result.stats
    return RankReport(
        rank=rank,
        bytes_read=stats.bytes_read,
        bytes_sent=stats.bytes_sent,
        bytes_received=stats.bytes_received,
        bytes_held=sum(d.numel() * d.element_size() for d in dests.values()),
        peak_staging_bytes=result.staging_bytes,
        seconds=clock.finish(),
        cpu_seconds=clock.cpu(),
        operations=net.operations,
        bytes_downloaded=fetched.stats.bytes_downloaded,
        bytes_copied=stats.bytes_copied,
        bytes_kernel_copied=stats.bytes_kernel_copied,
        bytes_direct=stats.bytes_direct,
        shared_buckets=stats.buckets,
    )


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
        as_dtensor: with a :class:`~distload.TensorParallel` placement, first parallelise
            the model as torch does (``parallelize_module`` on the ``tp`` dim of a
            ``(dp, tp)`` mesh over the world: ``ColwiseParallel`` / ``RowwiseParallel`` for each
            Linear or Embedding whose weight the rules shard), then load its DTensors: the
            model runs tensor parallel. Models whose parameters are already DTensors keep
            theirs without this flag.
        transforms: key transforms mapping checkpoint names and layouts onto the model's
            (e.g. split a fused ``qkv``, transpose GPT-2 Conv1D weights).
        kwargs: passed to :func:`load` (``staging_bytes``, ``timeout``, ...).

    Returns:
        ``(missing_keys, unexpected_keys, report)``.

    Buffers the checkpoint does not hold keep their value when real (build the model with
    ``accelerate.init_empty_weights()``, which keeps buffers real); meta buffers that the
    checkpoint does not hold are an error naming them, never left silently unset.
    """
    check_dtensor_request(as_dtensor, placement, group)
    if as_dtensor:  # collective: every rank builds the mesh here, in the same order
        parallelize(model, placement, device)
        placement = None  # the model's DTensors say where each shard goes
    entries = model_entries(model)
    groups = tie_groups(entries, declared_ties(model))
    if placement is None:
        placement = placement_of_dtensors(entries, group)
    for_model = getattr(placement, "for_model", None)
    if for_model is not None:  # DeviceMap, PipelineParallel: the model's modules and ties
        placement = for_model(model)
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
    missing = bind(entries, groups, state.plan, state)
    check_bound(entries, missing, strict=strict, source=source, skipped=state.plan.skipped)
    if isinstance(placement, DeviceMap):  # as transformers sets it: module path -> rank/"cpu"
        metas = output_metas(state.plan.outputs)
        model.hf_device_map = placement.resolve(metas, state.plan.world_size)  # type: ignore[assignment]
    if missing:
        log.warning("checkpoint lacks %d model tensor(s): %s", len(missing), missing[:8])
    return LoadIntoResult(sorted(missing), sorted(state.plan.skipped), state.report)
