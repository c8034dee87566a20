"""Single-GPU load benchmark: a safetensors checkpoint into CUDA destinations.

    python benchmarks/gpu.py --size-mb 8000 --rounds 3 --results benchmarks/RESULTS-gpu.md

Builds (once) a synthetic Llama-shaped bf16 checkpoint, preallocates every tensor on the GPU (as
a model materialised on the device would hold it), then fills it with each method, rounds
interleaved (after one untimed warm-up call of each), page cache evicted before each run
(cold) and, separately, warm:

* ``distload``: ``distload.load(..., out=dests)`` -- positioned reads into pinned staging
  arenas, asynchronous copies to the GPU overlapped with the next read (4, 8, 16 threads;
  with and without the kernel read-ahead hint for the next bucket);
* ``safe_open(device="cuda")``: safetensors' own path, ``get_tensor`` then ``copy_``;
* ``load_file(device="cuda")``: whole shards at once;
* ``fastsafetensors``: ``SafeTensorsFileLoader`` (no GDS) + ``get_tensor``, when installed.

Every method is checked bit for bit against CPU reads of the same files. The storage limit
(parallel ``pread`` of all shards, cold) and the host-to-device copy limit (pinned, 256 MiB
blocks) are measured alongside, and each method is reported in GB/s and as a fraction of both.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distload.bench.limits import storage_limit
from distload.bench.worker import evict

MiB = 2**20


def h2d_limit(nbytes: int = 256 * MiB, repeat: int = 8) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return nbytes * repeat / (time.perf_counter() - start)


def methods(root: Path) -> dict[str, Callable[[dict[str, torch.Tensor]], None]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    import distload
    import distload.storage

    files = sorted(str(p) for p in root.glob("*.safetensors"))

    Method = Callable[[dict[str, torch.Tensor]], None]

    def run_distload(threads: int, advise: bool = True) -> Method:
        def run(dests: dict[str, torch.Tensor]) -> None:
            distload.storage.ADVISE_AHEAD = advise
            try:
                distload.load(root, out=dests, device="cuda", read_threads=threads)
            finally:
                distload.storage.ADVISE_AHEAD = True

        return run

    def run_safe_open(dests: dict[str, torch.Tensor]) -> None:
        for f in files:
            with safe_open(f, "pt", device="cuda:0") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    dests[name].copy_(fh.get_tensor(name))

    def run_load_file(dests: dict[str, torch.Tensor]) -> None:
        for f in files:
            for name, t in load_file(f, device="cuda:0").items():
                dests[name].copy_(t)

    table = {
        "distload (4 read threads)": run_distload(4),
        "distload (8 read threads)": run_distload(8),
        "distload (8 read threads, no read-ahead hint)": run_distload(8, advise=False),
        "distload (16 read threads)": run_distload(16),
        "safe_open(device=cuda)": run_safe_open,
        "load_file(device=cuda)": run_load_file,
    }
    try:
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        def run_fst(dests: dict[str, torch.Tensor]) -> None:
            loader = SafeTensorsFileLoader(SingleGroup(), device="cuda:0", nogds=True)
            try:
                loader.add_filenames({0: files})
                fb = loader.copy_files_to_device()
                for name, dest in dests.items():
                    dest.copy_(fb.get_tensor(name))
                fb.close()
            finally:
                loader.close()

        table["fastsafetensors"] = run_fst
    except ImportError:
        pass
    return table


def main() -> int:
    from safetensors.torch import load_file

    from distload.synthetic import LlamaShape, write_llama

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=8000)
    parser.add_argument("--shard-mb", type=float, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="benchmarks/out")
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.stderr.write("benchmarks/gpu.py needs CUDA\n")
        return 2
    root = Path(args.workdir) / f"gpu-llama-{int(args.size_mb)}mb"
    if not (root / "model.safetensors.index.json").exists():
        sys.stderr.write(f"[gpu bench] writing {args.size_mb:g} MiB checkpoint to {root}\n")
        write_llama(
            root,
            LlamaShape.for_bytes(int(args.size_mb * MiB)),
            max_shard_bytes=int(args.shard_mb * MiB),
        )
    os.sync()
    total = sum(p.stat().st_size for p in root.glob("*.safetensors"))
    reference: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        # private copies: a mapped file's pages cannot be evicted, and "cold" would be warm
        reference.update({n: t.clone() for n, t in load_file(str(f)).items()})
    dests = {n: torch.empty_like(t, device="cuda") for n, t in reference.items()}
    table = methods(root)
    disk = statistics.median(storage_limit(root, 8) for _ in range(2))
    h2d = h2d_limit()
    for fn in table.values():  # first calls pay for imports, CUDA and pinned-memory set-up
        fn(dests)
    torch.cuda.synchronize()
    times: dict[tuple[str, str], list[float]] = {}
    exact: dict[str, bool] = {}
    for rnd in range(args.rounds):
        for mode in ("cold", "warm"):
            for name, fn in table.items():
                for d in dests.values():
                    d.zero_()
                torch.cuda.synchronize()
                if mode == "cold":
                    evict(root)
                else:  # warm: the files are in the page cache
                    for f in root.glob("*.safetensors"):
                        with open(f, "rb") as fh:
                            while fh.read(64 * MiB):
                                pass
                start = time.perf_counter()
                fn(dests)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                times.setdefault((name, mode), []).append(seconds)
                ok = all(
                    torch.equal(dests[n].cpu().view(torch.uint8), reference[n].view(torch.uint8))
                    for n in reference
                )
                exact[name] = exact.get(name, True) and ok
                sys.stderr.write(f"[gpu bench] round {rnd} {mode:4} {name}: {seconds:.2f} s\n")
    gpu = torch.cuda.get_device_name(0)
    lines = [
        "# distload single-GPU load benchmark",
        "",
        f"- date: {datetime.date.today().isoformat()}; GPU: {gpu}; {os.cpu_count()} CPU cores; "
        f"torch {torch.__version__}; Python {platform.python_version()}",
        f"- checkpoint: synthetic Llama-shaped bf16, {total / MiB:.0f} MiB in "
        f"{len(list(root.glob('*.safetensors')))} shards, into preallocated CUDA tensors",
        f"- command: `python benchmarks/gpu.py --size-mb {args.size_mb:g} --shard-mb "
        f"{args.shard_mb:g} --rounds {args.rounds}`",
        f"- storage limit (8 parallel preads, cold): {disk / 1e9:.2f} GB/s; pinned host-to-device "
        f"copy: {h2d / 1e9:.2f} GB/s",
        "- time: median over rounds; cold = page cache evicted before each run; warm = files in "
        "the page cache",
        "",
        "| method | cold s | cold GB/s | x storage limit | warm s | warm GB/s | x H2D limit | "
        "bit exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in table:
        cold = statistics.median(times[(name, "cold")])
        warm = statistics.median(times[(name, "warm")])
        lines.append(
            f"| {name} | {cold:.2f} | {total / cold / 1e9:.2f} | {total / cold / disk:.2f} | "
            f"{warm:.2f} | {total / warm / 1e9:.2f} | {total / warm / h2d:.2f} | {exact[name]} |"
        )
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(text)
    return 0 if all(exact.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
