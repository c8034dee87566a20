"""Transport over torch.distributed (NCCL for CUDA buffers, gloo for CPU buffers)."""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from distload.errors import PeerError

log = logging.getLogger(__name__)


class TorchDistTransport:
    """Collectives and point-to-point transfers on one process group.

    Every operation is issued asynchronously and waited on with ``timeout`` seconds, so a peer
    that died or stalled surfaces as :class:`PeerError` naming what this rank was waiting for.
    Ranks given to methods are ranks *within* ``group``.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        device: torch.device,
        timeout: float,
    ) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _wait(self, work: dist.Work | None, what: str) -> None:
        if work is None:
            return
        try:
            if self.device.type == "cuda":
                work.wait()
                torch.cuda.current_stream(self.device).synchronize()
            else:
                work.wait(timeout=self.timeout)
        except Exception as exc:  # gloo/nccl raise RuntimeError subclasses
            text = str(exc).split("\n")[0][:400]
            if "timed out" in text.lower() or "timeout" in text.lower():
                text = f"no answer within {self.timeout.total_seconds():g} s ({text})"
            phase = what.split(":", maxsplit=1)[0]
            raise PeerError(f"rank {self.rank}: {what}: {text}", phase=phase) from exc

    def broadcast(self, buf: torch.Tensor, src: int, what: str) -> None:
        self._wait(dist.broadcast(buf, self._global(src), group=self.group, async_op=True), what)

    def send(self, buf: torch.Tensor, dst: int, what: str) -> None:
        self._wait(dist.isend(buf, self._global(dst), group=self.group), what)

    def recv(self, buf: torch.Tensor, src: int, what: str) -> None:
        self._wait(dist.irecv(buf, self._global(src), group=self.group), what)

    def all_reduce_max(self, value: int, what: str) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._wait(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True), what)
        return int(t.item())

    def all_gather_bytes(self, data: bytes, what: str) -> list[bytes]:
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        self._wait(dist.all_gather(sizes, size, group=self.group, async_op=True), what)
        lengths = [int(s.item()) for s in sizes]
        width = max(lengths)
        if width == 0:
            return [b""] * self.world_size
        mine = torch.zeros(width, dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        mine = mine.to(self.device)
        outs = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._wait(dist.all_gather(outs, mine, group=self.group, async_op=True), what)
        return [bytes(o.cpu()[:n].numpy().tobytes()) for o, n in zip(outs, lengths, strict=True)]

    def broadcast_bytes(self, data: bytes | None, src: int, what: str) -> bytes:
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        size = size.to(self.device)
        self.broadcast(size, src, what)
        n = int(size.item())
        if self.rank == src:
            assert data is not None
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if n else torch.empty(0)
            buf = buf.to(torch.uint8).to(self.device)
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=self.device)
        if n:
            self.broadcast(buf, src, what)
        return data if self.rank == src and data is not None else bytes(buf.cpu().numpy())
