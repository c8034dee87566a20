"""Expert parallelism against tensor-parallel experts, measured: a Qwen3-MoE-shaped checkpoint
loaded by 4 processes over gloo.

Both placements shard attention over the 4 ranks with the ``qwen3_moe`` preset. With
``TensorParallel`` every routed expert is cut in 4 (each rank holds a quarter of every expert);
with ``Mesh(tp=4, ep=4)`` each expert is held whole by one rank (a quarter of the experts
each), so that rank reads it itself and nothing about it crosses the process group. Loads go
over the transport (``shm=False``, as between nodes) with the page cache evicted before each
(cold), the two placements interleaved round by round; every load is checked bit for bit
against safetensors on every rank. Reports the slowest rank's time, the bytes sent and the
bytes each rank ends with. Prints a markdown table and writes it to ``--out``.

    python benchmarks/experts.py --rounds 3

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
PLACEMENTS = ("experts cut over tp=4", "experts whole over ep=4")


def rank_worker(ckpt: str, which: str, out: str) -> None:
    """One rank: one cold, timed load with one placement, checked against safetensors."""
    import torch
    import torch.distributed as dist

    import distload
    from distload.bench.worker import evict
    from distload.verify import verify_against_safetensors

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rules = distload.preset("qwen3_moe")
    if which == PLACEMENTS[0]:
        placement: object = distload.TensorParallel(rules)
    else:
        placement = distload.Mesh(tp=4, ep=4, tp_rules=rules)
    if rank == 0:
        evict(Path(ckpt))
    dist.barrier()
    start = time.perf_counter()
    state = distload.load(ckpt, placement, shm=False)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    slowest = torch.tensor([elapsed], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    bad = verify_against_safetensors(state.plan, state, rank)
    flags = torch.tensor([1 if bad else 0])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if rank == 0:
        rep = state.report
        row = {
            "seconds": float(slowest),
            "bit_exact": int(flags) == 0,
            "sent": sum(r.bytes_sent for r in rep.ranks),
            "held": max(r.bytes_held for r in rep.ranks),
            "read": sum(r.bytes_read for r in rep.ranks),
            "buckets": {
                kind: sum(1 for b in state.plan.buckets if b.kind == kind)
                for kind in ("local", "p2p", "broadcast")
            },
        }
        Path(out).write_text(json.dumps(row))
    dist.destroy_process_group()


def run(ckpt: Path, which: str) -> dict:
    from distload.bench.driver import torchrun

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        argv = [str(Path(__file__).resolve()), "--rank-worker", str(ckpt), which, str(out)]
        torchrun(4, argv, env={"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}, quiet=True)
        return json.loads(out.read_text())


def build(workdir: Path, experts: int) -> Path:
    """A Qwen3-MoE-shaped bf16 checkpoint (8 layers of ``experts`` experts, ~1 GB at 64)."""
    import torch

    from distload.shapes import MoeShape, moe_tensors
    from distload.synthetic import write_checkpoint

    shape = MoeShape(
        hidden=1024, layers=8, heads=16, kv_heads=4, head_dim=64, experts=experts,
        expert_ffn=256, vocab=32000,
    )  # fmt: skip
    folder = workdir / f"moe-{experts}x8"
    if not (folder / "model.safetensors.index.json").exists():
        spec = {n: (s, torch.bfloat16) for n, s in moe_tensors(shape).items()}
        write_checkpoint(folder, spec, max_shard_bytes=300 * MiB)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=str(HERE / "out"))
    parser.add_argument("--out", default=str(HERE / "RESULTS-experts.md"))
    parser.add_argument("--rank-worker", nargs=3, metavar=("CKPT", "PLACEMENT", "OUT"))
    args = parser.parse_args()
    if args.rank_worker:
        rank_worker(*args.rank_worker)
        return
    from distload.bench.driver import interleaved, median_best, publish

    ckpt = build(Path(args.workdir).resolve(), args.experts)
    rows = interleaved(args.rounds, {name: partial(run, ckpt, name) for name in PLACEMENTS})
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    tensors = len(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"])
    lines = [
        "# Expert parallelism against tensor-parallel experts: 4 processes over gloo",
        "",
        f"- date: {datetime.date.today()}; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, Linux {platform.release()}",
        f"- checkpoint: Qwen3-MoE-shaped bf16, 8 layers x {args.experts} experts, {tensors} "
        f"tensors, {size / MiB:.0f} MiB; page cache evicted before each load; "
        "`shm=False` (transport)",
        f"- command: `python benchmarks/experts.py --experts {args.experts} "
        f"--rounds {args.rounds}`; placements interleaved round by round",
        "- time = slowest rank of one load (fresh processes each load); sent = all ranks; "
        "held = the rank holding most",
        "",
        "| placement | median s | best s | sent MiB | held MiB | read / checkpoint | "
        "buckets | bit exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, got in rows.items():
        first = got[0]
        lines.append(
            f"| {name} | {median_best(got)} | "
            f"{first['sent'] / MiB:.0f} | {first['held'] / MiB:.0f} | "
            f"{first['read'] / size:.2f}x | {first['buckets']} | "
            f"{all(g['bit_exact'] for g in got)} |"
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
