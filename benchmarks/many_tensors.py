"""Per-tensor overhead: a checkpoint of tens of thousands of tiny tensors, one process.

Builds (once) a checkpoint of ``--count`` tensors of 3-15 elements (bf16, f32, i32, as
per-expert biases and scales are), then loads it ``--repeat`` times with the page cache warm
(so only per-tensor costs are measured) by ``safetensors.torch.load_file`` on every shard,
``safe_open(...).get_tensor`` of every name, and ``distload.load``; every result is checked
bit for bit against ``load_file``. Prints a markdown table (median and best seconds) and
writes it to ``--out``.

    python benchmarks/many_tensors.py --count 20000 --repeat 5
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import distload
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distload-bench"))
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-many-tensors.md")
    args = parser.parse_args()
    folder = build(args.workdir, args.count)
    reference = by_load_file(folder)
    methods: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
        "load_file per shard": by_load_file,
        "safe_open + get_tensor": by_safe_open,
        "distload.load": by_distload,
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeat):  # interleaved rounds
        for name, fn in methods.items():
            start = time.perf_counter()
            got = fn(folder)
            times[name].append(time.perf_counter() - start)
            assert got.keys() == reference.keys(), name
            for key, tensor in reference.items():
                assert torch.equal(got[key].view(torch.uint8), tensor.view(torch.uint8)), key
    lines = [
        f"# {args.count} tiny tensors, one process, warm page cache",
        "",
        f"{datetime.date.today()}, {platform.node()}, {platform.processor() or platform.machine()}",
        f"command: `python benchmarks/many_tensors.py --count {args.count} --repeat {args.repeat}`",
        "",
        "| method | median s | best s | per tensor (median) |",
        "|---|---|---|---|",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.2f} | {min(ts):.2f} | {med / args.count * 1e6:.0f} us |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
