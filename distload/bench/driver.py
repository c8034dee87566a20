"""``distload bench``: every loading method, same checkpoint, same conditions, one table.

Builds (once) a synthetic Llama-shaped bf16 checkpoint, measures the storage limit (one
sequential reader and several parallel ones, page cache evicted), then runs each method under
torchrun for each scenario, methods interleaved round by round:

* ``tpN``: tensor parallel over N processes on this machine;
* ``dpN``: N processes on this machine, each loading a full copy (data-parallel replicas);
* ``2node``: two torchrun "nodes" of 2 processes each on this machine; node 1 runs in its own
  mount namespace where a copy of the checkpoint is bound over the same path, so each node
  reads its own storage and storage traffic is counted per node (needs root for ``unshare``).

Every rank writes into preallocated destinations, is checked bit for bit, and reports wall
time, peak private memory over its part, and bytes read from storage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from distload.api import DEFAULT_STAGING_BYTES
from distload.bench.limits import copy_limit, loopback_limit, storage_probe
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
    world = world_of(scenario)
    nodes = [r // 2 for r in range(world)] if scenario == "2node" else [0] * world
    placement = None if scenario.startswith("dp") else distload.TensorParallel(preset("llama"))
    plan = make_plan(index, world, placement, nodes=nodes)
    # one physical disk: the two simulated nodes share it
    bw = Bandwidths(node_storage=storage, shared_storage=storage, nic=net, intra=copy)
    return simulate(plan, bw).seconds


def world_of(kind: str) -> int:
    """Processes of a scenario kind: ``tpN`` / ``dpN`` -> N, ``2node`` -> 4."""
    if kind == "2node":
        return 4
    if kind[:2] in ("tp", "dp") and kind[2:].isdigit() and int(kind[2:]) > 0:
        return int(kind[2:])
    raise SystemExit(f"distload bench: unknown scenario {kind!r} (tpN, dpN or 2node)")


def _worker_cmd(
    method: str,
    ckpt: Path,
    out: Path,
    tag: str,
    staging_mb: float,
    *,
    warm: bool = False,
    replicate: bool = False,
) -> list[str]:
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
        *(["--warm"] if warm else []),
        *(["--placement", "replicate"] if replicate else []),
    ]


def run_single(
    method: str,
    nproc: int,
    ckpt: Path,
    *,
    out: Path,
    tag: str,
    staging_mb: float,
    warm: bool,
    replicate: bool = False,
) -> None:
    work = _worker_cmd(method, ckpt, out, tag, staging_mb, warm=warm, replicate=replicate)
    torchrun(nproc, work, env=_env())


def run_two_nodes(
    method: str, ckpt: Path, copy: Path, *, out: Path, tag: str, staging_mb: float, warm: bool
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
    work = _worker_cmd(method, ckpt, out, tag, staging_mb, warm=warm)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distload bench", description=__doc__)
    parser.add_argument("--size-mb", type=float, default=1500)
    parser.add_argument("--shard-mb", type=float, default=400)
    parser.add_argument("--scenarios", default="tp2,tp4,2node")
    parser.add_argument("--cache", default="cold,warm", help="cold (evicted), warm, or both")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", "--repeat", type=int, default=5, help="interleaved rounds")
    parser.add_argument(
        "--staging-mb", type=float, default=DEFAULT_STAGING_BYTES / 2**20, help="per rank"
    )
    parser.add_argument("--workdir", default="benchmarks/out")
    parser.add_argument("--results", default=None, help="also write the report to this file")
    return parser


def _checkpoints(args: argparse.Namespace, scenarios: list[str], notes: list[str]) -> Path:
    """The synthetic checkpoint (written once), and for ``2node`` its copy for node 1."""
    from distload.synthetic import LlamaShape, write_llama

    work = Path(args.workdir).resolve()
    ckpt = work / f"llama-{int(args.size_mb)}mb"
    if not (ckpt / "model.safetensors.index.json").exists():
        shape = LlamaShape.for_bytes(int(args.size_mb * MiB))
        write_llama(ckpt, shape, max_shard_bytes=int(args.shard_mb * MiB))
    if "2node" in scenarios:
        copy = _node1_copy(ckpt)
        if not two_nodes_supported():
            scenarios.remove("2node")
            notes.append("2node skipped: `unshare -m` (a private mount namespace) needs root")
        elif not (copy / "model.safetensors.index.json").exists():
            shutil.copytree(ckpt, copy, dirs_exist_ok=True)
    subprocess.run(["sync"], check=False)
    return ckpt


def _node1_copy(ckpt: Path) -> Path:
    return ckpt.parent / f"{ckpt.name}-node1"


def _folders(ckpt: Path, scenario: str) -> list[Path]:
    """The checkpoint copies a scenario reads: node 1's own copy only in ``2node``."""
    return [ckpt, _node1_copy(ckpt)] if scenario.startswith("2node") else [ckpt]


def _warm(*folders: Path) -> None:
    """Read every shard once so the next runs find it in the page cache."""
    for folder in folders:
        for path in folder.glob("*.safetensors"):
            with open(path, "rb") as fh:
                while fh.read(64 * MiB):
                    pass


def _one_run(
    args: argparse.Namespace, scenario: str, method: str, ckpt: Path, *, out: Path, tag: str
) -> list[dict]:
    """One method once in one scenario: every rank's row."""
    warm = scenario.endswith("warm")
    kind = scenario.split(maxsplit=1)[0]
    if kind == "2node":
        if not warm:
            evict(_node1_copy(ckpt))
        copy = _node1_copy(ckpt)
        run_two_nodes(method, ckpt, copy, out=out, tag=tag, staging_mb=args.staging_mb, warm=warm)
        nproc = 4
    else:
        nproc = world_of(kind)
        run_single(
            method,
            nproc,
            ckpt,
            out=out,
            tag=tag,
            staging_mb=args.staging_mb,
            warm=warm,
            replicate=kind.startswith("dp"),
        )
    return [json.loads((out / f"{tag}-{method}-{r}.json").read_text()) for r in range(nproc)]


def main(argv: list[str] | None = None) -> int:
    from distload.bench.tables import render

    args = _parser().parse_args(argv)
    notes: list[str] = []
    kinds = args.scenarios.split(",")
    for kind in kinds:
        world_of(kind)  # an unknown scenario fails before any work
    ckpt = _checkpoints(args, kinds, notes)
    files = sorted(ckpt.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    methods = [m for m in args.methods.split(",") if available(m)]
    notes += [f"{m} not installed: skipped" for m in args.methods.split(",") if m not in methods]
    SHM_DIR.mkdir(parents=True, exist_ok=True)
    one, many = storage_probe(ckpt, 1), storage_probe(ckpt, 4)
    direct = storage_probe(ckpt, 4, direct=True)
    assert one is not None and many is not None  # buffered reads work everywhere
    copy, net = copy_limit(), loopback_limit()
    limits = {
        "one": one.rate,
        "many": many.rate,
        "many_cpu": many.cpu_per_gb,
        "direct": direct.rate if direct else None,
        "direct_cpu": direct.cpu_per_gb if direct else None,
        "copy": copy,
        "net": net,
    }
    model = {k: predicted(ckpt, k, many.rate, copy, net) for k in kinds}
    scenarios = [f"{k} {c}" for c in args.cache.split(",") for k in kinds]
    out = Path(args.workdir).resolve() / "rows"
    shutil.rmtree(out, ignore_errors=True)
    rows: dict[str, dict[str, list[list[dict]]]] = {s: {m: [] for m in methods} for s in scenarios}
    for scenario in scenarios:
        for rnd in range(args.rounds):  # methods interleaved round by round
            for method in methods:
                sys.stderr.write(f"[bench] {scenario} round {rnd}: {method}\n")
                if scenario.endswith("warm"):  # before every run: idle cached pages get
                    _warm(*_folders(ckpt, scenario))  # reclaimed (a few % per minute here)
                tag = f"{scenario.replace(' ', '-')}-r{rnd}"
                run = _one_run(args, scenario, method, ckpt, out=out, tag=tag)
                rows[scenario][method].append(run)
    shutil.rmtree(SHM_DIR, ignore_errors=True)
    text = render(
        rows, args, total=total, nfiles=len(files), limits=limits, notes=notes, model=model
    )
    sys.stdout.write(text)
    if args.results:
        Path(args.results).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
