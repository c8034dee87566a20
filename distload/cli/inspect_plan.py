"""``distload inspect`` and ``distload plan``: one process, no process group.

For a Hub repository both pin the revision and read only the safetensors headers, with range
requests.
"""

from __future__ import annotations

import argparse
import json

from distload.checkpoint import DEFAULT_MAX_HEADER_BYTES
from distload.cli.args import placement_of, transforms_of
from distload.cli.output import out
from distload.gcpause import gc_paused
from distload.index import CheckpointIndex
from distload.placement import DeviceMap
from distload.plan import LoadPlan
from distload.planner import DEFAULT_BUCKET_BYTES, make_plan, traffic
from distload.report import human_bytes


def _read_index(args: argparse.Namespace) -> CheckpointIndex:
    """A local checkpoint's index, or a Hub source's (pinned commit, headers only)."""
    from distload.hub.options import HubOptions
    from distload.source import open_index

    if args.source.startswith("model:"):  # shapes of a real model family, no file (planning)
        from distload.shapes import MODELS, model_index

        name = args.source.removeprefix("model:")
        if name not in MODELS:
            raise SystemExit(f"distload: unknown model {name!r}; known: {', '.join(MODELS)}")
        return model_index(MODELS[name])
    options = HubOptions(
        revision=args.revision,
        subfolder=args.subfolder,
        cache_dir=args.cache_dir,
        variant=args.variant,
    )
    index, hub = open_index(
        args.source,
        options,
        max_header_bytes=DEFAULT_MAX_HEADER_BYTES,
        allow_pickle=getattr(args, "allow_pickle", False),
    )
    if hub is not None and not getattr(args, "json", False):
        out(
            f"hub: {hub.ref.repo_id} revision {hub.ref.revision!r} -> commit "
            f"{hub.commit}{' (offline, from the cache)' if hub.offline else ''}"
        )
    return index


def cmd_inspect(args: argparse.Namespace) -> int:
    index = _read_index(args)
    if args.json:  # the index alone: machine-readable output has nothing else on stdout
        out(json.dumps(index.to_json(), indent=1))
        return 0
    out(f"checkpoint {index.root}: OK")
    out(
        f"  {len(index.files)} file(s), {len(index.tensors)} tensors, "
        f"{human_bytes(index.total_bytes)}"
    )
    dtypes: dict[str, int] = {}
    for t in index.tensors:
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.nbytes
    out("  dtypes: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(dtypes.items())))
    out("")
    out(f"  {'file':40} {'tensors':>8} {'bytes':>12}")
    for f in index.files:
        ts = [t for t in index.tensors if t.file == f.name]
        out(f"  {f.name:40} {len(ts):>8} {human_bytes(sum(t.nbytes for t in ts)):>12}")
    if args.tensors:
        out("")
        out(f"  {'tensor':60} {'dtype':6} {'shape':20} {'bytes':>12}")
        for t in index.tensors:
            out(f"  {t.name:60} {t.dtype:6} {list(t.shape)!s:20} {human_bytes(t.nbytes):>12}")
    return 0


@gc_paused
def cmd_plan(args: argparse.Namespace) -> int:
    from distload.dtypes import parse_dtype

    index = _read_index(args)
    bucket = int((args.bucket_mb or DEFAULT_BUCKET_BYTES / 2**20) * 2**20)
    placement = placement_of(args)
    per_node = args.ranks_per_node or args.world
    nodes = [r // per_node for r in range(args.world)]
    plan = make_plan(
        index,
        args.world,
        placement,
        dtype=parse_dtype(args.dtype),
        bucket_bytes=bucket,
        transforms=transforms_of(args),
        nodes=nodes,
    )
    if isinstance(placement, DeviceMap):
        out("device map: " + json.dumps(placement.resolve(index.tensors, args.world)))
    kinds: dict[str, int] = {}
    for b in plan.buckets:
        kinds[b.kind] = kinds.get(b.kind, 0) + 1
    out(f"plan: {len(plan.tensors)} tensors, {human_bytes(index.total_bytes)}, world {args.world}")
    out(f"  placement: {plan.placement}")
    out(
        f"  {len(plan.buckets)} buckets of <= {human_bytes(bucket)} ("
        + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        + ")"
    )
    groups = plan.multicast_groups()
    if groups:
        sizes = sorted({len(g) for g in groups})
        out(
            f"  {sum(1 for b in plan.buckets if b.multicasts())} p2p buckets multicast to "
            f"classes of identical receivers: {len(groups)} sub-groups of "
            f"{'/'.join(map(str, sizes))} ranks (reader -> root -> broadcast in the class)"
        )
    if args.simulate:
        _print_simulation(plan, args)
        return 0
    out("")
    out(f"  {'rank':>4} {'reads':>12} {'sends':>12} {'receives':>12} {'holds':>12} {'staging':>12}")
    for s in traffic(plan):
        out(
            f"  {s.rank:>4} {human_bytes(s.read):>12} {human_bytes(s.sent):>12} "
            f"{human_bytes(s.received):>12} {human_bytes(s.held):>12} {human_bytes(s.staging):>12}"
        )
    if args.buckets:
        out("")
        for i, b in enumerate(plan.buckets):
            names = sorted({plan.tensors[it.tensor].name for it in b.items})
            classes = f" classes {[list(c) for c in b.classes]}"[:60] if b.classes else ""
            out(
                f"  bucket {i:>4} {b.kind:9} reader {b.reader:>3}{classes}  "
                f"{', '.join(names)[:100]}"
            )
    return 0


def _print_simulation(plan: LoadPlan, args: argparse.Namespace) -> None:
    """``distload plan --simulate``: the bandwidth model's prediction for ``plan``."""
    from distload.simulate import Bandwidths, simulate

    gb = 1e9
    bw = Bandwidths(
        node_storage=args.storage_gbps * gb,
        shared_storage=args.shared_storage_gbps * gb if args.shared_storage_gbps else None,
        nic=args.nic_gbps * gb,
        intra=args.intra_gbps * gb,
        latency=args.latency_us * 1e-6,
    )
    pred = simulate(plan, bw)
    nodes = len(pred.read_bytes_per_node)
    out(
        f"  model: {nodes} node(s) x {args.ranks_per_node or args.world} ranks; storage "
        f"{args.storage_gbps:g} GB/s per node"
        + (f", {args.shared_storage_gbps:g} GB/s shared" if args.shared_storage_gbps else "")
        + f"; NIC {args.nic_gbps:g} GB/s; intra-node {args.intra_gbps:g} GB/s"
    )
    out(f"  {pred.summary()}")
    out(
        "  busy: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in pred.busy.items())
        + f"; peak per rank (part + staging) {human_bytes(pred.peak_rank_bytes)}"
    )
    out("")
    out(f"  {'node':>4} {'reads':>12} {'NIC out':>12} {'NIC in':>12} {'intra-node':>12}")
    for n in range(nodes):
        out(
            f"  {n:>4} {human_bytes(pred.read_bytes_per_node[n]):>12} "
            f"{human_bytes(pred.nic_bytes_out[n]):>12} {human_bytes(pred.nic_bytes_in[n]):>12} "
            f"{human_bytes(pred.intra_bytes[n]):>12}"
        )
