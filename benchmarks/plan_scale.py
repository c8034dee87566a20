"""Coordinator cost for checkpoints of many tensors: planning, the plan's JSON, per-rank geometry.

Rank 0 plans while every other rank waits, and every rank then decodes the plan and works out
its own parts of every bucket, so these costs sit on every load's critical path. This builds
(in memory, no files) the index of Qwen3-30B-A3B (``distload.simulate.MODELS``: 48 layers x
128 experts x 3 projections, 18.9k tensors, 61 GB in bf16) and times, with the ``qwen3_moe``
TP preset, for a few meshes:

* ``make_plan`` (rank 0);
* ``LoadPlan.to_json`` (rank 0) and ``LoadPlan.from_json`` (every other rank), and the size;
* ``segments_for`` of every bucket for one rank (what each rank derives before moving bytes).

Best of ``--repeat`` runs each. Prints a markdown table and writes it to ``--out``.

    python benchmarks/plan_scale.py --repeat 3
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distload.geometry import segments_for
from distload.placement import Mesh, TensorParallel, preset
from distload.plan import LoadPlan
from distload.planner import make_plan
from distload.shapes import MODELS, model_index

HERE = Path(__file__).resolve().parent

MODEL = "qwen3-30b-a3b"


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls (the collector paused, as ``distload.load`` does)."""
    times, result = [], None
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-plan.md")
    args = parser.parse_args()
    index = model_index(MODELS[MODEL])
    rules = preset("qwen3_moe")
    cases: list[tuple[str, int, Any]] = [
        ("tp=8 (1 node)", 8, TensorParallel(rules)),
        ("dp=8 x tp=8 (8 nodes)", 64, Mesh(dp=8, tp=8, tp_rules=rules)),
        ("dp=4 x pp=4 x tp=8 (16 nodes)", 128, Mesh(dp=4, pp=4, tp=8, tp_rules=rules)),
        ("dp=64 x tp=8 (64 nodes)", 512, Mesh(dp=64, tp=8, tp_rules=rules)),
    ]
    total = sum(t.nbytes for t in index.tensors)
    lines = [
        f"# Coordinator cost: {MODEL} ({len(index.tensors)} tensors, {total / 1e9:.0f} GB bf16, "
        "qwen3_moe TP preset)",
        "",
        f"{datetime.date.today()}, {platform.node()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; best of "
        f"{args.repeat}",
        f"command: `python benchmarks/plan_scale.py --repeat {args.repeat}`",
        "",
        "| mesh | ranks | buckets | make_plan s (rank 0) | plan JSON MB | encode s | "
        "decode s (each rank) | segments of one rank s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, world, placement in cases:
        nodes = [r // 8 for r in range(world)]
        planned, plan = best(
            lambda w=world, p=placement, n=nodes: make_plan(
                index, w, p, bucket_bytes=64 * 2**20, nodes=n
            ),
            args.repeat,
        )
        encoded, data = best(plan.to_json, args.repeat)
        decoded, _ = best(lambda d=data: LoadPlan.from_json(d), args.repeat)
        rank = world - 1  # a rank that reads little itself: it derives most from others
        segments, _ = best(
            lambda p=plan, r=rank: [segments_for(p, b, r) for b in p.buckets], args.repeat
        )
        lines.append(
            f"| {label} | {world} | {len(plan.buckets)} | {planned:.2f} | {len(data) / 1e6:.1f} "
            f"| {encoded:.2f} | {decoded:.2f} | {segments:.2f} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
