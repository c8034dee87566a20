"""One rank of a benchmark run (started by torchrun from benchmarks/memory.py).

Measures the memory this rank holds (proportional set size, sampled every 2 ms) while loading its
tensor-parallel part of a checkpoint into preallocated destinations with one method, checks the
result bit for bit against safetensors, and writes a JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

import distload
from distload.api import DEFAULT_STAGING_BYTES
from distload.bench.worker import PeakSampler, evict, held, rss
from distload.checkpoint import read_checkpoint
from distload.placement import preset
from distload.planner import make_plan


def slices_for(plan, rank):  # type: ignore[no-untyped-def]
    from distload.placement.base import local_box

    out = {}
    for t, meta in enumerate(plan.tensors):
        box = local_box(meta.shape, plan.layouts[t], rank)
        out[meta.name] = (meta, tuple(slice(a, b) for a, b in box))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("ckpt")
    parser.add_argument("out")
    parser.add_argument("--staging-mb", type=float, default=DEFAULT_STAGING_BYTES / 2**20)
    parser.add_argument("--round", type=int, default=0)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(args.ckpt)
    index = read_checkpoint(root)
    tp = distload.TensorParallel(preset("llama"))
    plan = make_plan(index, world, tp)
    wanted = slices_for(plan, rank)
    if rank == 0:
        evict(root)
    dist.barrier()
    base = held()
    dests = {
        name: torch.empty(tuple(s.stop - s.start for s in sl), dtype=torch.bfloat16)
        for name, (meta, sl) in wanted.items()
    }
    for d in dests.values():  # touch the pages: the part is resident before loading
        d.view(torch.uint8).fill_(0)
    part = sum(d.numel() * d.element_size() for d in dests.values())
    after_alloc = held()
    base_file = rss()[1]
    sampler = PeakSampler()
    dist.barrier()
    start = time.perf_counter()
    report = None
    if args.method == "distload":
        state = distload.load(root, tp, out=dests, staging_bytes=int(args.staging_mb * 2**20))
        report = state.report.table()
        del state
    elif args.method == "load_file":  # every rank loads whole shards, keeps its slices
        for f in index.files:
            shard = load_file(str(root / f.name))
            for name, t in shard.items():
                if name in wanted:
                    dests[name].copy_(t[wanted[name][1]])
            del shard
    elif args.method == "get_slice":  # every rank reads only its slices (safe_open)
        for f in index.files:
            with safe_open(str(root / f.name), "pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    dests[name].copy_(fh.get_slice(name)[wanted[name][1]])
    else:
        raise SystemExit(f"unknown method {args.method}")
    elapsed = time.perf_counter() - start
    peak = sampler.stop()
    times = [torch.tensor([elapsed]) for _ in range(world)]
    dist.all_gather(times, torch.tensor([elapsed]))
    # bit-exact check against safetensors single-process reads
    ok = True
    for f in index.files:
        with safe_open(str(root / f.name), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                exp = fh.get_slice(name)[wanted[name][1]]
                ok &= torch.equal(exp.view(torch.int16), dests[name].view(torch.int16))
    row = {
        "method": args.method,
        "rank": rank,
        "world": world,
        "part_bytes": part,
        "baseline_held": base,
        "alloc_held": after_alloc,
        "peak_held": peak,
        "extra_over_part": peak - base - part,
        "peak_file_mapped": sampler.peak_file - base_file,
        "staging_budget": int(args.staging_mb * 2**20),
        "seconds": elapsed,
        "slowest_seconds": max(float(t.item()) for t in times),
        "bit_exact": bool(ok),
        "report": report,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.method}-{args.round}-{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
