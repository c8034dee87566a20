"""Concurrent p2p buckets, measured: a dp1 x pp2 x tp2 mesh over gloo, 4 processes.

Each pipeline stage's point-to-point buckets are read inside the stage and involve only its
two ranks, so the two stages' transfers can run at the same time. This loads the same
checkpoint with a status check of all ranks before every shared bucket
(``DISTLOAD_CHECK_EVERY=1``: the stages take turns, as every load did before buckets ran
concurrently) and with the default interval (64), in interleaved rounds, page cache warm
(transfers, not the disk, are measured), over the transport (``shm=False``). Every load is
checked bit for bit against single-process reads on every rank. Prints a markdown table
(median and best slowest-rank seconds) and writes it to ``--out``.

    python benchmarks/concurrency.py --size-mb 1500 --rounds 5

Run by rank with ``--rank-worker`` under torchrun (the driver starts it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 2**20


def rank_worker(ckpt: str, out: str) -> None:
    """One rank: one timed load with the mesh placement, checked against safetensors."""
    import torch
    import torch.distributed as dist
    from safetensors import safe_open

    import distload
    from distload.placement import preset

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    placement = distload.Mesh(pp=2, tp=2, tp_rules=preset("llama"))
    dist.barrier()
    start = time.perf_counter()
    state = distload.load(ckpt, placement, shm=False)
    elapsed = time.perf_counter() - start
    slowest = torch.tensor([elapsed], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    plan = state.plan
    output_of = {o.name: i for i, o in enumerate(plan.outputs)}
    exact = True
    for f in plan.index.files:
        with safe_open(str(Path(ckpt) / f.name), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name not in state:
                    continue
                i = output_of[name]
                box = distload.placement.local_box(plan.outputs[i].shape, plan.layouts[i], rank)
                assert box is not None
                expected = fh.get_slice(name)[tuple(slice(a, b) for a, b in box)]
                exact &= torch.equal(expected.view(torch.int16), state[name].view(torch.int16))
    flags = torch.tensor([0 if exact else 1])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if rank == 0:
        row = {
            "seconds": float(slowest),
            "bit_exact": int(flags) == 0,
            "shared_buckets": [r.shared_buckets for r in state.report.ranks],
            "plan_shared_buckets": sum(1 for b in plan.buckets if b.kind != "local"),
        }
        Path(out).write_text(json.dumps(row))
    dist.destroy_process_group()


def run(ckpt: Path, check_every: int) -> dict:
    from distload.bench.driver import torchrun

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        env = {
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "DISTLOAD_CHECK_EVERY": str(check_every),
        }
        argv = [str(Path(__file__).resolve()), "--rank-worker", str(ckpt), str(out)]
        torchrun(4, argv, env=env, timeout=600, quiet=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=1500)
    parser.add_argument("--shard-mb", type=float, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default=str(HERE / "out"))
    parser.add_argument("--out", default=str(HERE / "RESULTS-concurrency.md"))
    parser.add_argument("--rank-worker", nargs=2, metavar=("CKPT", "OUT"))
    args = parser.parse_args()
    if args.rank_worker:
        rank_worker(*args.rank_worker)
        return
    from distload.bench.driver import interleaved, median_best, publish
    from distload.synthetic import LlamaShape, write_llama

    ckpt = Path(args.workdir).resolve() / f"llama-{int(args.size_mb)}mb"
    if not (ckpt / "model.safetensors.index.json").exists():
        write_llama(
            ckpt,
            LlamaShape.for_bytes(int(args.size_mb * MiB)),
            max_shard_bytes=int(args.shard_mb * MiB),
        )
    for shard in sorted(ckpt.glob("*.safetensors")):  # warm: transfers are measured
        shard.read_bytes()
    settings = {"check before every shared bucket (stages take turns)": 1, "default (64)": 64}
    rows = interleaved(
        args.rounds, {name: partial(run, ckpt, every) for name, every in settings.items()}
    )
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    lines = [
        "# Concurrent p2p buckets: dp1 x pp2 x tp2 over gloo",
        "",
        f"- date: {datetime.date.today()}; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, Linux {platform.release()}",
        f"- checkpoint: synthetic Llama-shaped bf16, {size / MiB:.0f} MiB; page cache warm; "
        "4 processes, `Mesh(pp=2, tp=2)` with the llama preset, `shm=False` (transport)",
        f"- command: `python benchmarks/concurrency.py --size-mb {args.size_mb:g} "
        f"--rounds {args.rounds}`; settings interleaved round by round",
        "- time = slowest rank of one load (fresh processes each load)",
        "",
        "| status checks | median s | best s | shared buckets per rank (of all) | bit exact |",
        "|---|---|---|---|---|",
    ]
    for name, got in rows.items():
        lines.append(
            f"| {name} | {median_best(got)} | "
            f"{got[0]['shared_buckets']} (of {got[0]['plan_shared_buckets']}) | "
            f"{all(g['bit_exact'] for g in got)} |"
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
