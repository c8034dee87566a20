"""The machine's limits, measured in the same run as the benchmark they qualify: storage
read rate (page cache evicted; buffered and ``O_DIRECT``, with the CPU each costs per GB),
host memory copy rate, and loopback TCP rate."""

from __future__ import annotations

import mmap
import os
import resource
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from distload.bench.worker import evict

MiB = 2**20
BLOCK = 8 * MiB


def storage_limit(root: Path, threads: int) -> float:
    """Bytes/s reading every shard cold with ``threads`` positioned readers."""
    probe = storage_probe(root, threads)
    assert probe is not None  # buffered reads work on every filesystem
    return probe.rate


@dataclass(frozen=True)
class Probe:
    """One cold read of every shard: its rate and the CPU it cost per GB read."""

    nbytes: int  # bytes read
    rate: float  # bytes/s
    cpu_per_gb: float  # user + system seconds of this process per 1e9 bytes


def storage_probe(root: Path, threads: int, *, direct: bool = False) -> Probe | None:
    """Read every shard cold with ``threads`` positioned readers of ``BLOCK`` bytes, through
    the page cache or, ``direct``, with ``O_DIRECT`` into page-aligned buffers (a DMA: no
    kernel copy, no page-cache pages to fill and reclaim). None where ``O_DIRECT`` is refused
    (tmpfs, some network filesystems) or unknown to the platform."""
    flag = getattr(os, "O_DIRECT", 0) if direct else 0
    if direct and not flag:
        return None
    files = sorted(root.glob("*.safetensors"))
    evict(root)
    try:
        fds = {f: os.open(f, os.O_RDONLY | flag) for f in files}
    except OSError:
        return None
    jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, BLOCK)]
    lock = threading.Lock()
    total = [0]
    failed: list[OSError] = []

    def run() -> None:
        buf = mmap.mmap(-1, BLOCK)  # page aligned, as O_DIRECT needs
        view = memoryview(buf)
        try:
            while True:
                with lock:
                    if not jobs:
                        break
                    f, off = jobs.pop(0)
                n = os.preadv(fds[f], [view], off)  # BLOCK: aligned; EOF ends it short
                with lock:
                    total[0] += n
        except OSError as exc:  # EINVAL: this filesystem refuses O_DIRECT
            failed.append(exc)
        finally:
            view.release()
            buf.close()

    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    for fd in fds.values():
        os.close(fd)
    if failed or not total[0]:
        return None
    used = after.ru_utime - cpu.ru_utime + after.ru_stime - cpu.ru_stime
    return Probe(total[0], total[0] / seconds, used / (total[0] / 1e9))


def copy_limit(nbytes: int = 256 * MiB) -> float:
    """Bytes/s of one host-memory copy (what a same-node shared-memory exchange runs at)."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(4):
        dst.copy_(src)
    return 4 * nbytes / (time.perf_counter() - start)


def loopback_limit(nbytes: int = 256 * MiB) -> float:
    """Bytes/s over one TCP connection on loopback (the "network" between simulated nodes)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got = [0]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            buf = bytearray(4 * MiB)
            while got[0] < nbytes:
                n = conn.recv_into(buf)
                if not n:
                    break
                got[0] += n

    thread = threading.Thread(target=sink)
    thread.start()
    chunk = bytes(4 * MiB)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as client:
        for _ in range(nbytes // len(chunk)):
            client.sendall(chunk)
    thread.join()
    server.close()
    return got[0] / (time.perf_counter() - start)
