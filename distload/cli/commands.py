"""``distload load``, ``manifest`` and ``make-checkpoint``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from distload.checkpoint import read_checkpoint
from distload.cli.args import placement_of, transforms_of
from distload.cli.output import out
from distload.report import human_bytes

log = logging.getLogger("distload")


def cmd_load(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    from tqdm import tqdm

    from distload.api import load
    from distload.verify import verify_against_safetensors

    bars: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:  # bytes of the checkpoint moved
        if "load" not in bars:
            bars["load"] = tqdm(
                total=total, unit="B", unit_scale=True, desc="distload", disable=args.quiet
            )
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
            placement_of(args),
            dtype=args.dtype,
            device=args.device,
            bucket_bytes=bucket,
            timeout=args.timeout,
            progress=progress,
            transforms=transforms_of(args),
            transport=args.transport,
            direct_io=args.direct_io,
            verify=args.manifest,
            allow_pickle=args.allow_pickle,
            revision=args.revision,
            subfolder=args.subfolder,
            variant=args.variant,
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
        out(state.report.table())
        if args.verify:
            out(
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
    target = Path(args.output) if args.output else Path(index.root) / MANIFEST_NAME
    with tqdm(
        total=index.total_bytes, unit="B", unit_scale=True, desc="hashing", disable=args.quiet
    ) as bar:
        manifest = build_manifest(
            args.source, chunk_bytes=int(args.chunk_mb * 2**20), progress=bar.update
        )
    write_manifest(manifest, target)
    out(
        f"wrote {target}: sha256 of {len(manifest['files'])} file(s), "
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
    out(
        f"wrote {args.out}: Llama-shaped {shape}, {human_bytes(checkpoint_bytes(shape))} "
        f"({args.dtype})"
    )
    return 0
