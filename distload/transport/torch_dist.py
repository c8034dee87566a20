"""Transport over torch.distributed (NCCL for CUDA buffers, gloo for CPU buffers)."""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from distload.errors import Failure, PeerError

log = logging.getLogger(__name__)

# bytes of the first (often only) round of all_gather_bytes / broadcast_bytes: the length of
# the data and its first bytes travel together (argument fingerprints, rank reports and plans
# of a few hundred tensors fit; a plan of tens of thousands takes one more round)
INLINE_BYTES = 64 * 1024


class TorchDistTransport:
    """Collectives and point-to-point transfers on one process group.

    Every operation is issued asynchronously and waited on with ``timeout`` seconds, so a peer
    that died or stalled surfaces as :class:`PeerError` naming what this rank was waiting for.
    Ranks given to methods are ranks *within* ``group``. When a wait fails, the ranks that
    no longer answer are named (probed through the process group's store).
    """

    _count = 0

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
        TorchDistTransport._count += 1
        self.serial = TorchDistTransport._count  # same on every rank: one transport per load
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}  # members -> sub-group
        self.operations = 0
        # CUDA (NCCL) work has no waiting timeout of its own: it is polled against the load's
        # deadline instead; DISTLOAD_POLL_WAITS=1 polls host (gloo) work the same way
        self.poll = device.type == "cuda" or os.environ.get("DISTLOAD_POLL_WAITS") == "1"

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _wait(self, issue: Callable[[], dist.Work | None], what: str) -> None:
        """Issue one operation and wait for it; a failure while issuing (a peer's connection
        already closed) is handled like one while waiting: a PeerError naming who is gone."""
        self.operations += 1
        try:
            work = issue()
            if work is None:
                return
            if self.poll:
                self._poll(work, what)
            else:
                work.wait(timeout=self.timeout)
        except Exception as exc:  # gloo/nccl raise RuntimeError subclasses
            text = str(exc).split("\n")[0][:400]
            if "timed out" in text.lower() or "timeout" in text.lower():
                text = f"no answer within {self.timeout.total_seconds():g} s ({text})"
            phase = what.split(":", maxsplit=1)[0]
            silent = self._suspects(phase)
            failures = tuple(
                Failure(r, phase, "PeerError", f"rank {r} stopped answering") for r in silent
            )
            who = f"; ranks not answering: {list(silent)}" if silent else ""
            raise PeerError(
                f"rank {self.rank}: {what}: {text}{who}", phase=phase, failures=failures
            ) from exc

    def _poll(self, work: dist.Work, what: str) -> None:
        """Wait for ``work`` until the load's deadline, polling its completion (NCCL work
        cannot be waited on with a timeout). At the deadline the communicator is aborted, so
        no kernel stays queued behind a silent peer, and the wait fails like a timeout."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        pause = 2e-5
        while not work.is_completed():
            if time.monotonic() > deadline:
                self._abort()
                raise TimeoutError(
                    f"timed out after {self.timeout.total_seconds():g} s (polled: no answer)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)
        work.wait()  # completed: raises the work's own error, if any
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _abort(self) -> None:
        """Abort this load's NCCL communicator after a deadline passed (best effort; a host
        backend needs no abort: its waits already returned)."""
        if self.device.type != "cuda":
            return
        try:
            dist.distributed_c10d._abort_process_group(self.group)
        except Exception:  # the process group is unusable either way
            log.debug("could not abort the process group", exc_info=True)

    def _suspects(self, phase: str, wait: float = 3.0) -> tuple[int, ...]:
        """After a failed wait: survivors mark themselves alive in the process group's store;
        the ranks that do not within ``wait`` seconds are the ones that died or stalled.
        Empty when the store itself is gone (e.g. the rank hosting it died)."""
        try:
            store = dist.distributed_c10d._get_default_store()
            prefix = f"distload/{self.serial}/{phase}/alive/"
            # keys use global ranks: concurrent loads on different subgroups do not collide
            store.set(f"{prefix}{self._global(self.rank)}", "1")
            deadline = time.monotonic() + wait
            missing = list(range(self.world_size))
            while missing and time.monotonic() < deadline:
                missing = [r for r in missing if not store.check([f"{prefix}{self._global(r)}"])]
                if missing:
                    time.sleep(0.1)
            return tuple(missing)
        except Exception:  # the store is best effort: no suspects rather than a second error
            log.debug("could not probe peers through the store", exc_info=True)
            return ()

    def broadcast(self, buf: torch.Tensor, src: int, what: str) -> None:
        self._wait(
            lambda: dist.broadcast(buf, self._global(src), group=self.group, async_op=True), what
        )

    def send(self, buf: torch.Tensor, dst: int, what: str) -> None:
        self._wait(lambda: dist.isend(buf, self._global(dst), group=self.group), what)

    def recv(self, buf: torch.Tensor, src: int, what: str) -> None:
        self._wait(lambda: dist.irecv(buf, self._global(src), group=self.group), what)

    def all_reduce_max(self, value: int, what: str) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._wait(
            lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True),
            what,
        )
        return int(t.item())

    def _bytes_tensor(self, data: bytes, width: int) -> torch.Tensor:
        """``width`` bytes on the transport's device: the length of ``data`` (8 bytes, little
        endian), then as much of ``data`` as fits, then zeros."""
        buf = torch.zeros(width, dtype=torch.uint8)
        head = len(data).to_bytes(8, "little") + data[: width - 8]
        buf[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        return buf.to(self.device)

    def all_gather_bytes(self, data: bytes, what: str) -> list[bytes]:
        """Every rank's ``data``. One collective when every rank's fits in
        :data:`INLINE_BYTES` (the common case: the length travels with the bytes); a second
        one for the rest of longer ones."""
        mine = self._bytes_tensor(data, INLINE_BYTES)
        firsts = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._wait(lambda: dist.all_gather(firsts, mine, group=self.group, async_op=True), what)
        heads = [bytes(f.cpu().numpy().tobytes()) for f in firsts]
        lengths = [int.from_bytes(h[:8], "little") for h in heads]
        parts = [h[8 : 8 + n] for h, n in zip(heads, lengths, strict=True)]
        rest = max(lengths) - (INLINE_BYTES - 8)
        if rest <= 0:
            return parts
        tail = torch.zeros(rest, dtype=torch.uint8)
        extra = data[INLINE_BYTES - 8 :]
        if extra:
            tail[: len(extra)] = torch.frombuffer(bytearray(extra), dtype=torch.uint8)
        tail = tail.to(self.device)
        outs = [torch.empty_like(tail) for _ in range(self.world_size)]
        self._wait(lambda: dist.all_gather(outs, tail, group=self.group, async_op=True), what)
        return [
            part + bytes(o.cpu()[: max(0, n - (INLINE_BYTES - 8))].numpy().tobytes())
            for part, o, n in zip(parts, outs, lengths, strict=True)
        ]

    def broadcast_bytes(self, data: bytes | None, src: int, what: str) -> bytes:
        """Rank ``src``'s ``data`` on every rank: one broadcast when it fits in
        :data:`INLINE_BYTES`, a second one for the rest."""
        sending = self.rank == src
        if sending and data is None:
            raise ValueError("broadcast_bytes: the source rank must pass its data")
        payload = data if sending and data is not None else b""
        head = (
            self._bytes_tensor(payload, INLINE_BYTES)
            if sending
            else torch.empty(INLINE_BYTES, dtype=torch.uint8, device=self.device)
        )
        self.broadcast(head, src, what)
        if sending:
            extra = payload[INLINE_BYTES - 8 :]
            if extra:
                tail = torch.frombuffer(bytearray(extra), dtype=torch.uint8).to(self.device)
                self.broadcast(tail, src, what)
            return payload
        first = bytes(head.cpu().numpy().tobytes())
        n = int.from_bytes(first[:8], "little")
        got = first[8 : 8 + n]
        rest = n - (INLINE_BYTES - 8)
        if rest <= 0:
            return got
        tail = torch.empty(rest, dtype=torch.uint8, device=self.device)
        self.broadcast(tail, src, what)
        return got + bytes(tail.cpu().numpy().tobytes())

    def open_groups(self, groups: Sequence[tuple[int, ...]], what: str) -> bool:
        """One ``new_group`` per rank set, called by every rank in the same order.

        Only possible when the load's group is the whole world (``new_group`` is collective
        over the default group); a load on a caller's sub-group returns False. Ranks outside
        a set pass through at once; members meet in the new group's rendezvous, which waits at
        most the transport's timeout.
        """
        if not groups:
            return True
        if dist.get_world_size(self.group) != dist.get_world_size():
            return False
        try:
            for members in groups:
                ranks = sorted(self._global(r) for r in members)
                pg = dist.new_group(ranks, timeout=self.timeout)
                if self.rank in members and isinstance(pg, dist.ProcessGroup):
                    self._groups[tuple(sorted(members))] = pg
        except Exception as exc:
            self.close_groups()
            phase = what.split(":", maxsplit=1)[0]
            raise PeerError(
                f"rank {self.rank}: {what}: could not create a sub-group: {exc}", phase=phase
            ) from exc
        return True

    def group_broadcast(
        self, buf: torch.Tensor, members: tuple[int, ...], src: int, what: str
    ) -> None:
        pg = self._groups[tuple(sorted(members))]
        self._wait(lambda: dist.broadcast(buf, self._global(src), group=pg, async_op=True), what)

    def close_groups(self) -> None:
        for pg in self._groups.values():
            try:
                dist.destroy_process_group(pg)
            except Exception:  # best effort at teardown (e.g. after a peer died)
                log.debug("could not destroy a sub-group", exc_info=True)
        self._groups.clear()
