"""``distload`` command line: inspect, plan, load, manifest, make-checkpoint.

``inspect`` and ``plan`` run in one process without a process group (for a Hub repository
they pin the revision and read only the safetensors headers, with range requests); ``load``
runs on every rank of a launcher (torchrun, ...) and prints the report on rank 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distload.checkpoint import read_checkpoint
from distload.errors import DistLoadError
from distload.gcpause import gc_paused
from distload.index import CheckpointIndex
from distload.placement import (
    DeviceMap,
    ExpertParallel,
    Mesh,
    TensorParallel,
    preset,
    preset_transforms,
    presets,
)
from distload.placement.base import Placement
from distload.plan import LoadPlan
from distload.planner import DEFAULT_BUCKET_BYTES, make_plan, traffic
from distload.report import human_bytes

log = logging.getLogger("distload")


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _parse_rule(text: str) -> tuple[str, Any]:
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"rule {text!r} must be PATTERN=SPEC")
    if spec.startswith("shard"):
        from torch.distributed.tensor import Shard

        try:
            return pattern, Shard(int(spec[len("shard") :].strip("():")))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad shard spec {spec!r}; use shard0, shard1 ..."
            ) from None
    if spec in ("colwise", "rowwise", "replicate"):
        return pattern, spec
    raise argparse.ArgumentTypeError(
        f"unknown spec {spec!r}; valid: colwise, rowwise, replicate, shardN"
    )


def _device_map(text: str) -> DeviceMap:
    if text in ("auto", "balanced", "sequential"):
        return DeviceMap(text)
    try:
        mapping = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--device-map {text!r}: use auto, balanced, sequential or a JSON object"
        ) from None
    return DeviceMap(mapping)


def _transforms(args: argparse.Namespace) -> list[Any]:
    return preset_transforms(args.preset) if getattr(args, "preset", None) else []


def _placement(args: argparse.Namespace) -> Placement | None:
    if args.device_map is not None:
        return args.device_map  # type: ignore[no-any-return]
    rules: dict[str, Any] = {}
    for pattern, spec in args.rule or []:
        rules[pattern] = spec
    if args.preset:
        rules.update(preset(args.preset))
    if args.ep is not None or args.expert_tp is not None:
        if args.pp is None and args.dp is None and args.tp is None:
            # over the whole group: the group size is known only when the load runs
            return ExpertParallel(args.ep, tp_rules=rules, expert_tp=args.expert_tp or 1)
        return Mesh(
            dp=args.dp or 1,
            pp=args.pp or 1,
            tp=args.tp or 1,
            tp_rules=rules,
            ep=args.ep or (args.dp or 1) * (args.tp or 1) // (args.expert_tp or 1),
            expert_tp=args.expert_tp or 1,
        )
    if args.pp is not None or args.dp is not None:
        if not rules and args.tp:
            rules = preset("llama")
        return Mesh(dp=args.dp or 1, pp=args.pp or 1, tp=args.tp or 1, tp_rules=rules)
    if not rules and args.tp is None:
        return None
    if not rules:
        rules = preset("llama")
    return TensorParallel(rules, size=args.tp)


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: group)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (balanced by bytes)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel replicas (with --pp/--tp)")
    p.add_argument(
        "--ep",
        type=int,
        default=None,
        help="expert-parallel groups for routed experts, over the mesh given by --dp/--pp/--tp "
        "(all of it: dp*pp*tp = world) or, without those, over the whole group (default with "
        "--expert-tp: the ranks of a stage / expert-tp)",
    )
    p.add_argument(
        "--expert-tp", type=int, default=None, help="ranks each routed expert is cut over (1)"
    )
    p.add_argument(
        "--device-map",
        type=_device_map,
        default=None,
        help='auto | balanced | sequential | JSON {module prefix: rank or "cpu"}',
    )
    p.add_argument("--preset", choices=presets(), help="TP rule preset (default with --tp: llama)")
    p.add_argument(
        "--rule",
        action="append",
        type=_parse_rule,
        metavar="PATTERN=SPEC",
        help="TP rule, e.g. '*.q_proj.weight=colwise' or 'lm_head.weight=shard1' (repeatable)",
    )
    p.add_argument("--dtype", default=None, help="cast floating tensors (e.g. bfloat16)")
    p.add_argument(
        "--bucket-mb",
        type=float,
        default=None,
        help=f"bucket size in MiB (default {DEFAULT_BUCKET_BYTES // 2**20}, as distload.load)",
    )


def _add_hub_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None, help="Hub sources: branch, tag or commit")
    p.add_argument("--subfolder", default=None, help="Hub sources: folder holding the weights")
    p.add_argument("--cache-dir", default=None, help="Hub cache (default: HF_HUB_CACHE)")


def _read_index(args: argparse.Namespace) -> CheckpointIndex:
    """A local checkpoint's index, or a Hub source's (pinned commit, headers only)."""
    from distload.hub.options import HubOptions, resolve_source
    from distload.hub.remote import read_hub_index

    if args.source.startswith("model:"):  # shapes of a real model family, no file (planning)
        from distload.shapes import MODELS, model_index

        name = args.source.removeprefix("model:")
        if name not in MODELS:
            raise SystemExit(f"distload: unknown model {name!r}; known: {', '.join(MODELS)}")
        return model_index(MODELS[name])
    options = HubOptions(revision=args.revision, subfolder=args.subfolder, cache_dir=args.cache_dir)
    resolved = resolve_source(args.source, options)
    if resolved is None:
        return read_checkpoint(args.source)
    _out(
        f"hub: {resolved.ref.repo_id} revision {resolved.ref.revision!r} -> commit "
        f"{resolved.commit}{' (offline, from the cache)' if resolved.offline else ''}"
    )
    return read_hub_index(options.client(), resolved)


def cmd_inspect(args: argparse.Namespace) -> int:
    index = _read_index(args)
    _out(f"checkpoint {index.root}: OK")
    _out(
        f"  {len(index.files)} file(s), {len(index.tensors)} tensors, "
        f"{human_bytes(index.total_bytes)}"
    )
    if args.json:
        _out(json.dumps(index.to_json(), indent=1))
        return 0
    dtypes: dict[str, int] = {}
    for t in index.tensors:
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.nbytes
    _out("  dtypes: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(dtypes.items())))
    _out("")
    _out(f"  {'file':40} {'tensors':>8} {'bytes':>12}")
    for f in index.files:
        ts = [t for t in index.tensors if t.file == f.name]
        _out(f"  {f.name:40} {len(ts):>8} {human_bytes(sum(t.nbytes for t in ts)):>12}")
    if args.tensors:
        _out("")
        _out(f"  {'tensor':60} {'dtype':6} {'shape':20} {'bytes':>12}")
        for t in index.tensors:
            _out(f"  {t.name:60} {t.dtype:6} {list(t.shape)!s:20} {human_bytes(t.nbytes):>12}")
    return 0


@gc_paused
def cmd_plan(args: argparse.Namespace) -> int:
    from distload.dtypes import parse_dtype

    index = _read_index(args)
    bucket = int((args.bucket_mb or DEFAULT_BUCKET_BYTES / 2**20) * 2**20)
    placement = _placement(args)
    per_node = args.ranks_per_node or args.world
    nodes = [r // per_node for r in range(args.world)]
    plan = make_plan(
        index,
        args.world,
        placement,
        dtype=parse_dtype(args.dtype),
        bucket_bytes=bucket,
        transforms=_transforms(args),
        nodes=nodes,
    )
    if isinstance(placement, DeviceMap):
        _out("device map: " + json.dumps(placement.resolve(index.tensors, args.world)))
    kinds: dict[str, int] = {}
    for b in plan.buckets:
        kinds[b.kind] = kinds.get(b.kind, 0) + 1
    _out(f"plan: {len(plan.tensors)} tensors, {human_bytes(index.total_bytes)}, world {args.world}")
    _out(f"  placement: {plan.placement}")
    _out(
        f"  {len(plan.buckets)} buckets of <= {human_bytes(bucket)} ("
        + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        + ")"
    )
    groups = plan.multicast_groups()
    if groups:
        sizes = sorted({len(g) for g in groups})
        _out(
            f"  {sum(1 for b in plan.buckets if b.multicasts())} p2p buckets multicast to "
            f"classes of identical receivers: {len(groups)} sub-groups of "
            f"{'/'.join(map(str, sizes))} ranks (reader -> root -> broadcast in the class)"
        )
    if args.simulate:
        _print_simulation(plan, args)
        return 0
    _out("")
    _out(
        f"  {'rank':>4} {'reads':>12} {'sends':>12} {'receives':>12} {'holds':>12} {'staging':>12}"
    )
    for s in traffic(plan):
        _out(
            f"  {s.rank:>4} {human_bytes(s.read):>12} {human_bytes(s.sent):>12} "
            f"{human_bytes(s.received):>12} {human_bytes(s.held):>12} {human_bytes(s.staging):>12}"
        )
    if args.buckets:
        _out("")
        for i, b in enumerate(plan.buckets):
            names = sorted({plan.tensors[it.tensor].name for it in b.items})
            classes = f" classes {[list(c) for c in b.classes]}"[:60] if b.classes else ""
            _out(
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
    _out(
        f"  model: {nodes} node(s) x {args.ranks_per_node or args.world} ranks; storage "
        f"{args.storage_gbps:g} GB/s per node"
        + (f", {args.shared_storage_gbps:g} GB/s shared" if args.shared_storage_gbps else "")
        + f"; NIC {args.nic_gbps:g} GB/s; intra-node {args.intra_gbps:g} GB/s"
    )
    _out(f"  {pred.summary()}")
    _out(
        "  busy: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in pred.busy.items())
        + f"; peak per rank (part + staging) {human_bytes(pred.peak_rank_bytes)}"
    )
    _out("")
    _out(f"  {'node':>4} {'reads':>12} {'NIC out':>12} {'NIC in':>12} {'intra-node':>12}")
    for n in range(nodes):
        _out(
            f"  {n:>4} {human_bytes(pred.read_bytes_per_node[n]):>12} "
            f"{human_bytes(pred.nic_bytes_out[n]):>12} {human_bytes(pred.nic_bytes_in[n]):>12} "
            f"{human_bytes(pred.intra_bytes[n]):>12}"
        )


def cmd_load(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    from tqdm import tqdm

    from distload.api import load
    from distload.verify import verify_against_safetensors

    bars: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:
        if "load" not in bars:
            bars["load"] = tqdm(total=total, unit="bucket", desc="distload", disable=args.quiet)
        bars["load"].update(done - bars["load"].n)

    def download_progress(done: int, total: int) -> None:
        if "download" not in bars:
            bars["download"] = tqdm(
                total=total, unit="B", unit_scale=True, desc="download", disable=args.quiet
            )
        bars["download"].update(done - bars["download"].n)

    try:
        bucket = int(args.bucket_mb * 2**20) if args.bucket_mb else None
        state = load(
            args.source,
            _placement(args),
            dtype=args.dtype,
            device=args.device,
            bucket_bytes=bucket,
            timeout=args.timeout,
            progress=progress,
            transforms=_transforms(args),
            transport=args.transport,
            verify=args.manifest,
            allow_pickle=args.allow_pickle,
            revision=args.revision,
            subfolder=args.subfolder,
            cache_dir=args.cache_dir,
            hub_cache=args.hub_cache,
            extra_files=args.extra_file or (),
            download_progress=download_progress,
        )
    finally:
        for bar in bars.values():
            bar.close()
    rank = state.rank
    status = 0
    if args.verify:
        bad = verify_against_safetensors(state.plan, state, rank, state.root)
        if bad:
            log.error("rank %d: %d tensor(s) differ from safetensors: %s", rank, len(bad), bad[:5])
            status = 1
        status = state.all_max(status)
    if rank == 0:
        _out(state.report.table())
        if args.verify:
            _out(
                "verify: every rank's pieces equal safetensors single-process reads"
                if status == 0
                else "verify: MISMATCH (see the log above)"
            )
    if dist.is_initialized():
        dist.destroy_process_group()
    return status


def cmd_manifest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from distload.manifest import MANIFEST_NAME, build_manifest, write_manifest

    index = read_checkpoint(args.source)
    out = Path(args.output) if args.output else Path(index.root) / MANIFEST_NAME
    with tqdm(
        total=index.total_bytes, unit="B", unit_scale=True, desc="hashing", disable=args.quiet
    ) as bar:
        manifest = build_manifest(
            args.source, chunk_bytes=int(args.chunk_mb * 2**20), progress=bar.update
        )
    write_manifest(manifest, out)
    _out(
        f"wrote {out}: sha256 of {len(manifest['files'])} file(s), "
        f"{len(manifest['tensors'])} tensors in chunks of {args.chunk_mb:g} MiB"
    )
    return 0


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    import torch

    from distload.synthetic import LlamaShape, checkpoint_bytes, write_llama

    shape = (
        LlamaShape.for_bytes(int(args.size_mb * 2**20))
        if args.size_mb
        else LlamaShape(layers=args.layers)
    )
    write_llama(
        args.out,
        shape,
        dtype=getattr(torch, args.dtype),
        max_shard_bytes=int(args.shard_mb * 2**20),
    )
    _out(
        f"wrote {args.out}: Llama-shaped {shape}, {human_bytes(checkpoint_bytes(shape))} "
        f"({args.dtype})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distload", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="validate a checkpoint and list its files and tensors")
    p.add_argument("source")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--json", action="store_true", help="print the index as JSON")
    _add_hub_args(p)
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("plan", help="who reads, sends, receives and holds what (no launch)")
    p.add_argument(
        "source",
        help="a checkpoint, a Hub repo, or model:NAME (shapes only: llama-8b|70b|405b, "
        "qwen3-30b-a3b, qwen3-235b-a22b, deepseek-v3)",
    )
    p.add_argument("--world", type=int, required=True, help="number of ranks")
    p.add_argument("--ranks-per-node", type=int, default=None, help="default: all on one node")
    p.add_argument("--buckets", action="store_true", help="list every bucket")
    p.add_argument("--simulate", action="store_true", help="predict time and link traffic")
    p.add_argument("--storage-gbps", type=float, default=2.0, help="storage GB/s per node")
    p.add_argument(
        "--shared-storage-gbps", type=float, default=None, help="shared filesystem aggregate GB/s"
    )
    p.add_argument("--nic-gbps", type=float, default=25.0, help="network GB/s per node")
    p.add_argument("--intra-gbps", type=float, default=150.0, help="intra-node link GB/s")
    p.add_argument("--latency-us", type=float, default=50.0, help="fixed cost per bucket")
    _add_placement_args(p)
    _add_hub_args(p)
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("load", help="load under a launcher (torchrun ...), print the report")
    p.add_argument("source")
    p.add_argument("--verify", action="store_true", help="compare with safetensors reads")
    p.add_argument(
        "--manifest",
        nargs="?",
        const=True,
        default=False,
        help="check every byte against a manifest while reading (default path: in SOURCE)",
    )
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK or cpu")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for peers")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .bin/.pt (zip) checkpoints, read with the weights-only unpickler",
    )
    p.add_argument(
        "--transport",
        choices=("auto", "torch", "mpi"),
        default="auto",
        help="torch.distributed (default) or MPI via mpi4py (CPU)",
    )
    _add_placement_args(p)
    _add_hub_args(p)
    p.add_argument(
        "--hub-cache",
        choices=("auto", "shared", "node"),
        default="auto",
        help="Hub sources: which ranks share a cache (auto: probe the cache folder)",
    )
    p.add_argument(
        "--extra-file",
        action="append",
        metavar="NAME",
        help="Hub sources: also fetch this file or pattern, e.g. config.json (repeatable)",
    )
    p.set_defaults(fn=cmd_load)

    p = sub.add_parser("manifest", help="write sha256 per file, tensor and chunk (for verify=)")
    p.add_argument("source")
    p.add_argument("-o", "--output", default=None, help="default: SOURCE/distload.manifest.json")
    p.add_argument("--chunk-mb", type=float, default=16.0, help="hash chunk size in MiB")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_manifest)

    p = sub.add_parser(
        "bench",
        help="benchmark distload against the alternatives (options: distload bench --help)",
        add_help=False,
    )
    p.set_defaults(fn=lambda _args: 0)

    p = sub.add_parser("make-checkpoint", help="write a synthetic Llama-shaped checkpoint")
    p.add_argument("out")
    p.add_argument("--size-mb", type=float, default=None, help="approximate size in MiB")
    p.add_argument("--layers", type=int, default=4, help="layers of the tiny default shape")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shard-mb", type=float, default=64.0, help="max shard size in MiB")
    p.set_defaults(fn=cmd_make_checkpoint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser: options pass through untouched
        from distload.bench.driver import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.fn(args))
    except DistLoadError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
