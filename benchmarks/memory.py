"""Peak private memory per rank while loading a tensor-parallel checkpoint.

Builds (once) a synthetic Llama-shaped bf16 checkpoint of ``--size-mb``, then for each method
starts ``--nproc`` ranks with torchrun; every rank preallocates its TP part, evicts nothing but
the page cache, samples the memory it holds while loading (private memory plus the shared-memory
staging it created), and checks its pieces bit for bit. The claim checked for distload: peak
held - baseline <= own part + staging budget.

    python benchmarks/memory.py --size-mb 1500 --nproc 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

from distload.api import DEFAULT_STAGING_BYTES
from distload.shm import shm_dir

HERE = Path(__file__).resolve().parent
MiB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=1500)
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--shard-mb", type=float, default=500)
    parser.add_argument("--staging-mb", type=float, default=DEFAULT_STAGING_BYTES / 2**20)
    parser.add_argument("--methods", default="distload,get_slice,load_file")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default=str(HERE / "out"))
    parser.add_argument("--results", default=str(HERE / "RESULTS-memory.md"))
    args = parser.parse_args()

    work = Path(args.workdir)
    ckpt = work / f"llama-{int(args.size_mb)}mb"
    if not (ckpt / "model.safetensors.index.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "distload.cli",
                "make-checkpoint",
                str(ckpt),
                "--size-mb",
                str(args.size_mb),
                "--shard-mb",
                str(args.shard_mb),
            ],
            check=True,
        )
    subprocess.run(["sync"], check=False)  # no write-back of a fresh checkpoint during runs
    rows: dict[tuple[str, int], list[dict]] = {}
    methods = args.methods.split(",")
    shm = shm_dir() / f"distload-memory-{os.getpid()}"
    shm.mkdir(parents=True, exist_ok=True)
    for rnd in range(args.repeat):
        for method in methods:  # interleaved, so drift on the machine hits every method
            out = work / "rows"
            env = dict(
                os.environ,
                OMP_NUM_THREADS="1",
                GLOO_SOCKET_IFNAME="lo",
                DISTLOAD_SHM_DIR=str(shm),  # staging files counted for the rank creating them
            )
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc-per-node",
                    str(args.nproc),
                    "--master-port",
                    str(free_port()),
                    str(HERE / "rank_worker.py"),
                    method,
                    str(ckpt),
                    str(out),
                    "--staging-mb",
                    str(args.staging_mb),
                    "--round",
                    str(rnd),
                ],
                check=True,
                env=env,
            )
            for rank in range(args.nproc):
                row = json.loads((out / f"{method}-{rnd}-{rank}.json").read_text())
                rows.setdefault((method, rank), []).append(row)

    shutil.rmtree(shm, ignore_errors=True)
    total = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    lines = [
        f"## Peak memory held per rank, TP over {args.nproc} processes",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, {platform.system()} {platform.release()}; torch gloo on CPU",
        f"- checkpoint: synthetic Llama-shaped bf16, {total / MiB:.0f} MiB in "
        f"{len(list(ckpt.glob('*.safetensors')))} shards (<= {args.shard_mb:.0f} MiB each), "
        "page cache evicted before each method",
        f"- command: `python benchmarks/memory.py --size-mb {args.size_mb:g} --nproc {args.nproc}"
        f" --shard-mb {args.shard_mb:g} --staging-mb {args.staging_mb:g} --repeat {args.repeat}`",
        f"- {args.repeat} rounds, methods interleaved; times are medians, memory the worst round",
        "- peak held = sampled every 2 ms: private memory (RssAnon) plus the shared-memory staging "
        "files the rank created (same-node exchange; a peer's files it only reads count for that "
        "peer), minus what the rank held before its part was allocated; part = the rank's "
        "preallocated destination tensors (bf16)",
        "- file pages mapped = peak RssFile growth: safetensors maps the shard files, so those "
        "methods' reads show up as mapped page-cache pages rather than private memory",
        "",
        "| method | rank | part MiB | peak held MiB | extra over part MiB | within part + "
        f"staging ({args.staging_mb:.0f} MiB)? | peak file pages mapped MiB | rank s (median) | "
        "slowest rank s (median) | bit exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    failed = False
    for (method, rank), runs in rows.items():
        worst = max(runs, key=lambda r: r["peak_held"] - r["baseline_held"])
        peak = (worst["peak_held"] - worst["baseline_held"]) / MiB
        extra = max(r["extra_over_part"] for r in runs)
        mapped = max(r["peak_file_mapped"] for r in runs) / MiB
        within = extra <= worst["staging_budget"]
        exact = all(r["bit_exact"] for r in runs)
        if method == "distload" and (not within or not exact):
            failed = True
        lines.append(
            f"| {method} | {rank} | {worst['part_bytes'] / MiB:.1f} | {peak:.1f} | "
            f"{extra / MiB:.1f} | {'yes' if within else 'NO'} | {mapped:.1f} | "
            f"{statistics.median(r['seconds'] for r in runs):.2f} | "
            f"{statistics.median(r['slowest_seconds'] for r in runs):.2f} | {exact} |"
        )
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    Path(args.results).write_text(
        "# distload memory benchmark\n\n"
        "Generated by `benchmarks/memory.py`; rerun the command below to reproduce.\n\n" + text
    )
    if failed:
        sys.exit("distload exceeded part + staging budget on some rank (or was not bit exact)")


if __name__ == "__main__":
    main()
