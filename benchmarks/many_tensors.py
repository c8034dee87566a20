"""Per-tensor overhead: a checkpoint of tens of thousands of tiny tensors.

Builds (once) a checkpoint of ``--count`` tensors of 3-15 elements (bf16, f32, i32, as
per-expert biases and scales are), then loads it ``--repeat`` times with the page cache warm
(so only per-tensor costs are measured):

* in one process, by ``safetensors.torch.load_file`` on every shard, ``safe_open(...)
  .get_tensor`` of every name, and ``distload.load``;
* with ``--ranks N`` also in N processes under torchrun (gloo), every rank wanting every
  tensor: ``load_file`` on every rank against ``distload.load`` (one read, shared); the time
  is the slowest rank's.

Every result is checked bit for bit against ``load_file``. Prints markdown tables (median
and best seconds) and writes them to ``--out``.

    python benchmarks/many_tensors.py --count 20000 --repeat 5 --ranks 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import distload
from distload.bench.driver import publish, torchrun
from distload.synthetic import write_checkpoint

HERE = Path(__file__).resolve().parent


def build(root: Path, count: int) -> Path:
    folder = root / f"many-{count}"
    if (folder / "model.safetensors.index.json").exists():
        return folder
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for i in range(count):
        dtype = (torch.bfloat16, torch.float32, torch.int32)[i % 3]
        spec[f"model.experts.{i // 8}.w{i % 8}"] = ((i % 5 + 1, 3), dtype)
    return write_checkpoint(folder, spec, max_shard_bytes=200_000)


def by_load_file(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def by_safe_open(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = f.get_tensor(name)
    return out


def by_distload(folder: Path) -> dict[str, torch.Tensor]:
    return dict(distload.load(folder, device="cpu"))


def check(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], name: str) -> None:
    assert got.keys() == reference.keys(), name
    for key, tensor in reference.items():
        assert torch.equal(got[key].view(torch.uint8), tensor.view(torch.uint8)), (name, key)


def table(times: dict[str, list[float]], count: int) -> list[str]:
    lines = ["| method | median s | best s | per tensor (median) |", "|---|---|---|---|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.2f} | {min(ts):.2f} | {med / count * 1e6:.0f} us |")
    return lines


def one_process(folder: Path, repeat: int) -> dict[str, list[float]]:
    reference = by_load_file(folder)
    methods: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
        "load_file per shard": by_load_file,
        "safe_open + get_tensor": by_safe_open,
        "distload.load": by_distload,
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeat):  # interleaved rounds
        for name, fn in methods.items():
            start = time.perf_counter()
            got = fn(folder)
            times[name].append(time.perf_counter() - start)
            check(got, reference, name)
    return times


def worker(folder: Path, repeat: int, out: Path) -> None:
    """One rank under torchrun: every method in turn, timed from a barrier to the slowest
    rank's end (an all-reduce of the rank times)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    reference = by_load_file(folder)
    methods: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
        "load_file per shard, every rank": by_load_file,
        "distload.load": by_distload,
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeat):
        for name, fn in methods.items():
            dist.barrier()
            start = time.perf_counter()
            got = fn(folder)
            took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            times[name].append(took.item())
            check(got, reference, name)
            del got
    if dist.get_rank() == 0:
        out.write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def several_processes(folder: Path, repeat: int, ranks: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        argv = [__file__, "--worker", str(folder), "--repeat", str(repeat), "--times", str(out)]
        torchrun(ranks, argv, env={"OMP_NUM_THREADS": "1"})
        times: dict[str, list[float]] = json.loads(out.read_text())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=0, help="also run in N processes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distload-bench"))
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-many-tensors.md")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--times", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.repeat, args.times)
        return
    folder = build(args.workdir, args.count)
    command = f"python benchmarks/many_tensors.py --count {args.count} --repeat {args.repeat}"
    if args.ranks > 1:
        command += f" --ranks {args.ranks}"
    lines = [
        f"# {args.count} tiny tensors, warm page cache",
        "",
        f"{datetime.date.today()}, {platform.node()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        f"command: `{command}`",
        "",
        "## One process",
        "",
        *table(one_process(folder, args.repeat), args.count),
    ]
    if args.ranks > 1:
        lines += [
            "",
            f"## {args.ranks} processes (torchrun, gloo), every rank loads every tensor",
            "",
            "Time of the slowest rank.",
            "",
            *table(several_processes(folder, args.repeat, args.ranks), args.count),
        ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
