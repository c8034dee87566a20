"""``distload`` command line: inspect, plan, load, manifest, make-checkpoint.

``inspect`` and ``plan`` run in one process without a process group (for a Hub repository
they pin the revision and read only the safetensors headers, with range requests); ``load``
runs on every rank of a launcher (torchrun, ...) and prints the report on rank 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from distload.cli.args import add_hub_args, add_placement_args, placement_of
from distload.cli.commands import cmd_load, cmd_make_checkpoint, cmd_manifest
from distload.cli.inspect_plan import cmd_inspect, cmd_plan
from distload.errors import DistLoadError

_placement = placement_of  # the placement the placement options describe

__all__ = ["build_parser", "main"]


Commands = argparse._SubParsersAction  # the parsers of the sub-commands


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("distload")
    except PackageNotFoundError:  # running from a source tree
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``distload`` parser: one sub-command each for inspect, plan, load, manifest, bench
    and make-checkpoint."""
    parser = argparse.ArgumentParser(
        prog="distload",
        description="Load safetensors checkpoints into every process of a distributed "
        "PyTorch job: each byte read once, only the needed slices moved. inspect and plan "
        "run in one process (a Hub repository: pinned revision, headers only); load runs "
        "on every rank of a launcher (torchrun, srun, mpirun).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"distload {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_inspect(sub)
    _add_plan(sub)
    _add_load(sub)
    _add_others(sub)
    return parser


def _add_inspect(sub: Commands) -> None:
    p = sub.add_parser("inspect", help="validate a checkpoint and list its files and tensors")
    p.add_argument("source")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--json", action="store_true", help="print the index as JSON (only that)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .bin/.pt (zip) checkpoints, read with the weights-only unpickler",
    )
    add_hub_args(p)
    p.set_defaults(fn=cmd_inspect)


def _add_plan(sub: Commands) -> None:
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
    add_placement_args(p)
    add_hub_args(p)
    p.set_defaults(fn=cmd_plan)


def _add_load(sub: Commands) -> None:
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
    p.add_argument(
        "--no-direct-io",
        dest="direct_io",
        action="store_false",
        help="read every block through the page cache (default: O_DIRECT for blocks it lacks)",
    )
    add_placement_args(p)
    add_hub_args(p)
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


def _add_others(sub: Commands) -> None:
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
