"""Coordinator cost for checkpoints of many tensors: planning, the plan's JSON, per-rank geometry.

Rank 0 plans while every other rank waits, and every rank then decodes the plan and works out
its own parts of every bucket, so these costs sit on every load's critical path. This builds
(in memory, no files) the index of a mixture-of-experts model (``distload.shapes.MODELS``):
Qwen3-30B-A3B (48 layers x 128 experts x 3 projections, 18.9k tensors, 61 GB in bf16) with the
``qwen3_moe`` TP preset, or DeepSeek-V3 (``--model deepseek-v3``: 92k tensors, 689 GB in fp8
with block scales) with the ``deepseek_v3`` preset, also with expert parallelism, and times
for a few meshes:

* ``make_plan`` (rank 0);
* ``LoadPlan.to_json`` (rank 0) and ``LoadPlan.from_json`` (every other rank), and the size;
* ``segments_for`` of every bucket for one rank (what each rank derives before moving bytes).

Best of ``--repeat`` runs each. Prints a markdown table and writes it to ``--out``.

    python benchmarks/plan_scale.py --repeat 3
    python benchmarks/plan_scale.py --repeat 2 --model deepseek-v3
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

from distload.bench.driver import publish
from distload.geometry import segments_for
from distload.placement import Mesh, TensorParallel, preset
from distload.plan import LoadPlan
from distload.planner import make_plan
from distload.shapes import MODELS, model_index

HERE = Path(__file__).resolve().parent

PRESETS = {"qwen3-30b-a3b": "qwen3_moe", "deepseek-v3": "deepseek_v3"}


def cases(model: str, rules: dict[str, Any]) -> list[tuple[str, int, Any]]:
    """(label, ranks, placement) for the meshes timed on ``model``."""
    if model == "deepseek-v3":
        return [
            ("tp=16 (2 nodes)", 16, TensorParallel(rules)),
            ("dp=4 x tp=8 (4 nodes)", 32, Mesh(dp=4, tp=8, tp_rules=rules)),
            ("dp=4 x tp=8, experts ep=32 (4 nodes)", 32, Mesh(dp=4, tp=8, ep=32, tp_rules=rules)),
            ("dp=32 x tp=8 (32 nodes)", 256, Mesh(dp=32, tp=8, tp_rules=rules)),
            (
                "dp=32 x tp=8, experts ep=256 (32 nodes)",
                256,
                Mesh(dp=32, tp=8, ep=256, tp_rules=rules),
            ),
        ]
    return [
        ("tp=8 (1 node)", 8, TensorParallel(rules)),
        ("dp=8 x tp=8 (8 nodes)", 64, Mesh(dp=8, tp=8, tp_rules=rules)),
        ("dp=4 x pp=4 x tp=8 (16 nodes)", 128, Mesh(dp=4, pp=4, tp=8, tp_rules=rules)),
        ("dp=64 x tp=8 (64 nodes)", 512, Mesh(dp=64, tp=8, tp_rules=rules)),
    ]


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
    parser.add_argument("--model", choices=sorted(PRESETS), default="qwen3-30b-a3b")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: RESULTS-plan.md (qwen3-30b-a3b) or RESULTS-plan-<model>.md",
    )
    args = parser.parse_args()
    if args.out is None:
        suffix = "" if args.model == "qwen3-30b-a3b" else f"-{args.model}"
        args.out = HERE / f"RESULTS-plan{suffix}.md"
    index = model_index(MODELS[args.model])
    total = sum(t.nbytes for t in index.tensors)
    command = f"python benchmarks/plan_scale.py --repeat {args.repeat}"
    if args.model != "qwen3-30b-a3b":
        command += f" --model {args.model}"
    lines = [
        f"# Coordinator cost: {args.model} ({len(index.tensors)} tensors, {total / 1e9:.0f} GB, "
        f"{PRESETS[args.model]} TP preset)",
        "",
        f"{datetime.date.today()}, {platform.node()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; best of "
        f"{args.repeat}",
        f"command: `{command}`",
        "",
        "| mesh | ranks | buckets | make_plan s (rank 0) | plan JSON MB | encode s | "
        "decode s (each rank) | segments of one rank s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, world, placement in cases(args.model, preset(PRESETS[args.model])):
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
    publish(lines, args.out)


if __name__ == "__main__":
    main()
