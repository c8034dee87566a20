"""``distload bench``: every loading method, same checkpoint, same conditions, one table.

Builds (once) a synthetic Llama-shaped bf16 checkpoint, measures the storage limit (one
sequential reader and several parallel ones, page cache evicted), then runs each method under
torchrun for each scenario, methods interleaved round by round:

* ``tpN``: tensor parallel over N processes on this machine;
* ``2node``: two torchrun "nodes" of 2 processes each on this machine; node 1 runs in its own
  mount namespace where a copy of the checkpoint is bound over the same path, so each node
  reads its own storage and storage traffic is counted per node (needs root for ``unshare``).

Every rank writes into preallocated destinations, is checked bit for bit, and reports wall
time, peak private memory over its part, and bytes read from storage.
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
from collections.abc import Callable
from pathlib import Path

from distload.api import DEFAULT_STAGING_BYTES
from distload.bench.limits import copy_limit, loopback_limit, storage_limit
from distload.bench.methods import METHODS, available
from distload.bench.worker import evict
from distload.shm import shm_dir

MiB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(
    nproc: int,
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 900,
    quiet: bool = False,
) -> None:
    """Run ``argv`` (a script and its arguments) as ``nproc`` local ranks under torchrun on a
    free port; ``env`` adds to this process's environment; raises if any rank fails."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        *argv,
    ]
    environment = {**os.environ, **(env or {})}
    subprocess.run(cmd, check=True, env=environment, timeout=timeout, capture_output=quiet)


def interleaved(rounds: int, settings: dict[str, Callable[[], dict]]) -> dict[str, list[dict]]:
    """Run every setting once per round, the settings interleaved round by round (so drift of
    the machine falls on all of them alike); each run returns a dict with ``seconds``."""
    rows: dict[str, list[dict]] = {name: [] for name in settings}
    for r in range(rounds):
        for name, run in settings.items():
            rows[name].append(run())
            print(f"round {r}: {name}: {rows[name][-1]['seconds']:.2f} s", file=sys.stderr)
    return rows


def median_best(rows: list[dict]) -> str:
    """``median | best`` table cells of the runs' seconds."""
    secs = [row["seconds"] for row in rows]
    return f"{statistics.median(secs):.2f} | {min(secs):.2f}"


def publish(lines: list[str], out: str | Path) -> None:
    """Print a markdown report and write it to ``out``."""
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out).write_text(text)


def predicted(ckpt: Path, scenario: str, storage: float, copy: float, net: float) -> float:
    """distload's time for ``scenario`` under ``distload.simulate``'s model, fed the limits
    measured on this machine (a check of the model against the measured runs)."""
    import distload
    from distload.checkpoint import read_checkpoint
    from distload.placement import preset
    from distload.planner import make_plan
    from distload.simulate import Bandwidths, simulate

    index = read_checkpoint(ckpt)
    world = 4 if scenario == "2node" else int(scenario.removeprefix("tp"))
    nodes = [r // 2 for r in range(world)] if scenario == "2node" else [0] * world
    plan = make_plan(index, world, distload.TensorParallel(preset("llama")), nodes=nodes)
    # one physical disk: the two simulated nodes share it
    bw = Bandwidths(node_storage=storage, shared_storage=storage, nic=net, intra=copy)
    return simulate(plan, bw).seconds


def _worker_cmd(method: str, ckpt: Path, out: Path, tag: str, staging_mb: float) -> list[str]:
    return [
        "-m",
        "distload.bench.worker",
        method,
        str(ckpt),
        str(out),
        "--tag",
        tag,
        "--staging-mb",
        str(staging_mb),
    ]


def run_single(
    method: str, nproc: int, ckpt: Path, *, out: Path, tag: str, staging_mb: float
) -> None:
    torchrun(nproc, _worker_cmd(method, ckpt, out, tag, staging_mb), env=_env())


def run_two_nodes(
    method: str, ckpt: Path, copy: Path, *, out: Path, tag: str, staging_mb: float
) -> None:
    port = free_port()
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
    ]
    work = _worker_cmd(method, ckpt, out, tag, staging_mb)
    node0 = subprocess.Popen([*base, "--node-rank", "0", *work], env=_env())
    inner = " ".join([*base, "--node-rank", "1", *work])
    node1 = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount --bind '{copy}' '{ckpt}' && exec {inner}",
        ],
        env=_env(),
    )
    codes = [node0.wait(timeout=900), node1.wait(timeout=900)]
    if any(codes):
        raise subprocess.CalledProcessError(max(codes), "two-node run")


def _env() -> dict[str, str]:
    """Worker environment: one math thread per rank, loopback gloo, and a shared-memory folder
    of the benchmark's own (its staging files are counted for the ranks that create them)."""
    return dict(
        os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", DISTLOAD_SHM_DIR=str(SHM_DIR)
    )


SHM_DIR = shm_dir() / f"distload-bench-{os.getpid()}"


def two_nodes_supported() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


def summarise(rows: list[dict], total: int) -> dict:
    return {
        "slowest": statistics.median(
            statistics.median(r["slowest_seconds"] for r in rows if r["tag_round"] == k)
            for k in sorted({r["tag_round"] for r in rows})
        ),
        "extra": max(r["extra_over_part"] for r in rows),
        "budget": rows[0]["staging_budget"],
        "read": statistics.median(r["job_storage_read"] for r in rows) / total,
        "exact": all(r["bit_exact"] for r in rows),
        "part": max(r["part_bytes"] for r in rows),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distload bench", description=__doc__)
    parser.add_argument("--size-mb", type=float, default=1500)
    parser.add_argument("--shard-mb", type=float, default=400)
    parser.add_argument("--scenarios", default="tp2,tp4,2node")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--staging-mb", type=float, default=DEFAULT_STAGING_BYTES / 2**20, help="per rank"
    )
    parser.add_argument("--workdir", default="benchmarks/out")
    parser.add_argument("--results", default=None, help="also write the table to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from distload.synthetic import LlamaShape, write_llama

    work = Path(args.workdir).resolve()
    ckpt = work / f"llama-{int(args.size_mb)}mb"
    if not (ckpt / "model.safetensors.index.json").exists():
        write_llama(
            ckpt,
            LlamaShape.for_bytes(int(args.size_mb * MiB)),
            max_shard_bytes=int(args.shard_mb * MiB),
        )
    subprocess.run(["sync"], check=False)
    files = sorted(ckpt.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    methods = [m for m in args.methods.split(",") if available(m)]
    skipped = [m for m in args.methods.split(",") if m not in methods]
    scenarios = args.scenarios.split(",")
    copy = work / f"{ckpt.name}-node1"
    notes = []
    if "2node" in scenarios:
        if two_nodes_supported():
            if not (copy / "model.safetensors.index.json").exists():
                shutil.copytree(ckpt, copy, dirs_exist_ok=True)
                subprocess.run(["sync"], check=False)
        else:
            scenarios.remove("2node")
            notes.append("2node skipped: `unshare -m` (a private mount namespace) needs root")

    SHM_DIR.mkdir(parents=True, exist_ok=True)
    one = storage_limit(ckpt, 1)
    many = storage_limit(ckpt, 4)
    copy_bw, net_bw = copy_limit(), loopback_limit()
    model = {s: predicted(ckpt, s, many, copy_bw, net_bw) for s in scenarios}
    results: dict[str, dict[str, dict]] = {}
    out = work / "rows"
    shutil.rmtree(out, ignore_errors=True)
    for scenario in scenarios:
        rows: dict[str, list[dict]] = {}
        for rnd in range(args.repeat):
            for method in methods:
                tag = f"{scenario}-r{rnd}"
                sys.stderr.write(f"[bench] {scenario} round {rnd}: {method}\n")
                if scenario == "2node":
                    evict(copy)
                    run_two_nodes(method, ckpt, copy, out=out, tag=tag, staging_mb=args.staging_mb)
                    nproc = 4
                else:
                    nproc = int(scenario.removeprefix("tp"))
                    run_single(method, nproc, ckpt, out=out, tag=tag, staging_mb=args.staging_mb)
                for rank in range(nproc):
                    row = json.loads((out / f"{tag}-{method}-{rank}.json").read_text())
                    row["tag_round"] = rnd
                    rows.setdefault(method, []).append(row)
        results[scenario] = {m: summarise(r, total) for m, r in rows.items()}

    shutil.rmtree(SHM_DIR, ignore_errors=True)
    text = render(
        results,
        args,
        total=total,
        nfiles=len(files),
        one=one,
        many=many,
        notes=notes
        + [f"{m} not installed: skipped" for m in skipped]
        + [
            f"model inputs: host copy {copy_bw / 1e9:.2f} GB/s, loopback TCP "
            f"{net_bw / 1e9:.2f} GB/s, storage {many / 1e9:.2f} GB/s"
        ],
        model=model,
    )
    sys.stdout.write(text)
    if args.results:
        Path(args.results).write_text(text)
    return 0


def render(
    results: dict[str, dict[str, dict]],
    args: argparse.Namespace,
    *,
    total: int,
    nfiles: int,
    one: float,
    many: float,
    notes: list[str],
    model: dict[str, float] | None = None,
) -> str:
    lines = [
        "# distload load benchmark",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, {platform.system()} {platform.release()}; gloo on CPU",
        f"- checkpoint: synthetic Llama-shaped bf16, {total / MiB:.0f} MiB in {nfiles} shards; "
        "page cache evicted before every run; TP with the llama preset",
        f"- command: `distload bench --size-mb {args.size_mb:g} --shard-mb {args.shard_mb:g} "
        f"--scenarios {args.scenarios} --repeat {args.repeat} --staging-mb "
        f"{args.staging_mb:g}`",
        f"- storage limit (cold, all shards): {one / 1e9:.2f} GB/s with one reader, "
        f"{many / 1e9:.2f} GB/s with 4 parallel readers -> {total / many:.2f} s for the "
        "checkpoint at best",
        "- time = slowest rank, median over rounds; memory = peak memory held "
        "(RssAnon plus the shared-memory staging files the rank created; a peer's files it only "
        "reads count for that peer; "
        "sampled every 2 ms) over the rank's own part, worst rank and round; storage read = "
        "bytes the job fetched from storage (/proc/self/io) / checkpoint bytes",
        *[f"- {n}" for n in notes],
        "",
    ]
    for scenario, rows in results.items():
        alternatives = [r["slowest"] for m, r in rows.items() if m != "distload"]
        fastest = min(alternatives) if alternatives else float("nan")
        lines += [
            f"## {scenario}",
            "",
            "| method | time s | x fastest alternative | fraction of storage limit | "
            "extra memory MiB (worst rank) | storage read x ckpt | bit exact |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, r in rows.items():
            lines.append(
                f"| {method} | {r['slowest']:.2f} | {r['slowest'] / fastest:.2f} | "
                f"{(total / r['slowest']) / many:.2f} | {r['extra'] / MiB:.0f} | "
                f"{r['read']:.2f} | {r['exact']} |"
            )
        d = rows.get("distload")
        if d is not None and alternatives:
            budget_ok = d["extra"] <= d["budget"]
            lines += [
                "",
                f"distload: {d['slowest'] / fastest:.2f} x the fastest alternative (target "
                f"<= {0.5 if scenario == '2node' else 0.6}); extra memory "
                f"{'within' if budget_ok else 'OVER'} the {d['budget'] / MiB:.0f} MiB staging "
                f"budget; storage read {d['read']:.2f} x the checkpoint.",
            ]
            if model and scenario in model:
                lines.append(
                    f"`distload plan --simulate` predicts {model[scenario]:.2f} s from the "
                    f"measured limits (measured {d['slowest']:.2f} s, ratio "
                    f"{d['slowest'] / model[scenario]:.2f})."
                )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
