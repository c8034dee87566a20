"""One rank of one benchmark run: ``python -m distload.bench.worker METHOD CKPT OUT``.

Started by torchrun from ``distload.bench.driver``. The rank preallocates and touches its
tensor-parallel part (or, ``--placement replicate``, a full copy), then loads it with one
method while a thread samples the memory it holds (private pages plus the shared-memory
staging it created) every 2 ms; it counts the
bytes it read from storage (``/proc/self/io``), checks its part bit for bit against
safetensors single-process reads, and writes one JSON row. Rank 0 of each node evicts the
checkpoint from the page cache first.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import resource
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """``name: N kB`` lines of a /proc file, in bytes."""
    found: dict[str, int] = {}
    with open(path) as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in names:
                found[key] = int(line.split()[1]) * 1024
    return found


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _own_slot_ranges() -> list[tuple[int, int]]:
    """Address ranges of the shared-memory staging files this rank created and mapped
    (``DISTLOAD_SHM_DIR`` is set by the benchmark driver; files are named
    ``distload-<load>-<rank>-shm<slot>``), from ``/proc/self/maps``: one line per mapping,
    so cheap, unlike ``smaps`` whose page-table walk cost several ms per read."""
    folder = os.environ.get("DISTLOAD_SHM_DIR")
    if not folder:
        return []
    rank = os.environ.get("RANK", "0")
    own = re.compile(rf"{re.escape(os.path.realpath(folder))}/distload-[^/ ]*-{rank}-shm\d+")
    ranges = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            if own.search(line):
                lo, hi = line.split(" ", 1)[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


def _resident(ranges: list[tuple[int, int]]) -> int:
    """Resident bytes of mapped address ranges (``mincore``); a range no longer mapped
    counts 0."""
    total = 0
    for lo, hi in ranges:
        vec = ctypes.create_string_buffer((hi - lo + _PAGE - 1) // _PAGE)
        if _libc.mincore(lo, hi - lo, vec) == 0:
            total += (len(vec.raw) - vec.raw.count(0)) * _PAGE  # low bit: resident
    return total


def own_shared_bytes() -> int:
    """Resident bytes of the shared-memory staging files this rank created.

    Found through this process's mappings, since the files are unlinked right after every
    rank has mapped them. Shared memory is counted where it is allocated: a rank's own slots
    count for it, the peers' slots it only reads from do not (they count for their owners), so
    the ranks' figures add up to what the node really holds."""
    return _resident(_own_slot_ranges())


def rss() -> tuple[int, int]:
    """(RssAnon, RssFile) of this process in bytes: private memory and mapped file pages."""
    status = _fields("/proc/self/status", ("RssAnon", "RssFile"))
    return status.get("RssAnon", 0), status.get("RssFile", 0)


def held() -> int:
    """Memory this rank holds now: private pages plus the shared-memory staging it created."""
    return rss()[0] + own_shared_bytes()


class PeakSampler:
    """Samples held memory (:func:`held`) and mapped file pages every 2 ms; keeps the peaks."""

    def __init__(self) -> None:
        self._shared = own_shared_bytes()
        self.peak, self.peak_file = rss()[0] + self._shared, rss()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self, shared: bool = True) -> None:
        anon, file = rss()
        if shared:  # staging slots live for the whole load: a slower rate is enough
            self._shared = own_shared_bytes()
        self.peak = max(self.peak, anon + self._shared)
        self.peak_file = max(self.peak_file, file)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            self._sample(shared=n % 20 == 0)
            n += 1
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.peak


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def storage_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (page-cache hits excluded)."""
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def settle_collector() -> None:
    """Collect this worker's own objects and freeze them, right before the timed call.

    A full collection of them (torch's modules, the plan, the destinations: some 170,000)
    takes 0.2-0.3 s here; due after the set-up, it would run inside whichever method's timed
    call first allocates enough, and decide the figure. Frozen, only what a method itself
    allocates is ever collected."""
    gc.collect()
    gc.freeze()


def evict(root: Path) -> None:
    """Drop the checkpoint's pages from the page cache (cold reads for the next method)."""
    from distload.residency import evict as evict_file

    for path in root.glob("*.safetensors"):
        evict_file(path)


def _parser(methods: list[str], staging_bytes: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("method", choices=methods)
    parser.add_argument("ckpt")
    parser.add_argument("out")
    parser.add_argument("--staging-mb", type=float, default=staging_bytes / 2**20, help="per rank")
    parser.add_argument("--tag", default="run")
    parser.add_argument("--warm", action="store_true", help="keep the page cache (no eviction)")
    parser.add_argument(
        "--placement",
        choices=("tp", "replicate"),
        default="tp",
        help="tp: each rank its tensor-parallel part; replicate: every rank a full copy",
    )
    return parser


def bit_exact(
    root: Path,
    files: list[str],
    wanted: dict[str, tuple[int, tuple[slice, ...]]],
    dests: dict[str, torch.Tensor],
) -> bool:
    """Whether every destination holds, bit for bit, the slice safetensors reads itself."""
    from safetensors import safe_open

    ok = True
    for file in files:
        with safe_open(str(root / file), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name in wanted:
                    expected = fh.get_slice(name)[wanted[name][1]]
                    ok &= torch.equal(expected.view(torch.int16), dests[name].view(torch.int16))
    return ok


def main() -> None:
    import distload
    from distload import api
    from distload.bench.methods import METHODS, Context
    from distload.checkpoint import read_checkpoint
    from distload.placement import preset
    from distload.placement.base import local_box
    from distload.planner import make_plan

    args = _parser(sorted(METHODS), api.DEFAULT_STAGING_BYTES).parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    node = int(os.environ.get("GROUP_RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    root = Path(args.ckpt)
    index = read_checkpoint(root)
    placement = distload.TensorParallel(preset("llama")) if args.placement == "tp" else None
    plan = make_plan(index, world, placement)
    wanted = {}
    for out, o in enumerate(plan.outputs):
        box = local_box(o.shape, plan.layouts[out], rank)
        if box is not None:
            wanted[o.name] = (out, tuple(slice(a, b) for a, b in box))
    if local_rank == 0 and not args.warm:  # each "node" evicts its own copy
        evict(root)
    dist.barrier()
    base = held()
    dests = {
        name: torch.empty(tuple(s.stop - s.start for s in sl), dtype=torch.bfloat16)
        .view(torch.uint8)
        .fill_(0)
        .view(torch.bfloat16)  # touched: resident before loading
        for name, (_, sl) in wanted.items()
    }
    part = sum(d.numel() * d.element_size() for d in dests.values())
    ctx = Context(
        root, index, plan, placement, rank, world, wanted, dests, int(args.staging_mb * 2**20)
    )
    io_before = storage_read_bytes()
    sampler = PeakSampler()
    settle_collector()
    dist.barrier()
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    METHODS[args.method](ctx)
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_before
    peak = sampler.stop()
    read = storage_read_bytes() - io_before
    figures = torch.tensor([elapsed, float(read), cpu], dtype=torch.float64)
    everyone = [torch.zeros_like(figures) for _ in range(world)]
    dist.all_gather(everyone, figures)
    ok = bit_exact(root, [f.name for f in index.files], wanted, dests)
    row = {
        "method": args.method,
        "rank": rank,
        "node": node,
        "world": world,
        "part_bytes": part,
        "extra_over_part": peak - base - part,
        "staging_budget": int(args.staging_mb * 2**20),
        "seconds": elapsed,
        "slowest_seconds": max(float(t[0]) for t in everyone),
        "storage_read": read,
        "job_storage_read": sum(float(t[1]) for t in everyone),
        "job_cpu_seconds": sum(float(t[2]) for t in everyone),  # user + sys, every rank
        "copies_per_byte": ctx.copies_per_byte,  # distload only: from its report
        "bit_exact": bool(ok),
        "phases": ctx.phases,  # distload only: seconds per phase on this rank
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.tag}-{args.method}-{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
