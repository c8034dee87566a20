"""The machine's limits, measured in the same run as the benchmark they qualify: storage
read rate (page cache evicted), host memory copy rate, and loopback TCP rate."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from distload.bench.worker import evict

MiB = 2**20
BLOCK = 8 * MiB


def storage_limit(root: Path, threads: int) -> float:
    """Bytes/s reading every shard cold with ``threads`` positioned readers."""
    files = sorted(root.glob("*.safetensors"))
    evict(root)
    jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, BLOCK)]
    lock = threading.Lock()
    total = [0]

    def run() -> None:
        fds: dict[Path, int] = {}
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while True:
            with lock:
                if not jobs:
                    break
                f, off = jobs.pop(0)
            fd = fds.setdefault(f, os.open(f, os.O_RDONLY))
            n = os.preadv(fd, [view], off)
            with lock:
                total[0] += n
        for fd in fds.values():
            os.close(fd)

    start = time.perf_counter()
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return total[0] / (time.perf_counter() - start)


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
