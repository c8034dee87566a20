"""The three ways a shared bucket reaches its ranks: broadcast, point to point, shared memory.

Runs on every rank that takes part in a bucket, on the main thread, in the plan's global
order. Over the transport (:class:`TransportExchange`), a ``broadcast`` bucket moves one
packed buffer from the reader to every rank, and a ``p2p`` bucket sends each class of
receivers only its own parts, packed once per class: point to point to a single rank, a
multicast (reader -> root -> broadcast inside the class) to several. On one node
(:class:`ShmBuckets`), the reader thread has already read the bucket into a shared-memory
slot; each rank copies its parts from it as soon as it is published (no collective).

Once this rank has failed (``status.pending``) it keeps to the schedule: its sends go out
unfilled and what it receives is dropped, so no peer waits on it before the next check.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distload.arenas import Arenas
from distload.execute.copies import Copier, WholeLayout
from distload.execute.reader import Read
from distload.execute.status import ExecStats, Status
from distload.geometry import Message, Segment, read_slots, wire_messages
from distload.plan import Bucket
from distload.shm import ShmExchange
from distload.transport.base import Transport


class TransportExchange:
    """Shared buckets over the transport (NCCL, gloo, MPI)."""

    def __init__(
        self,
        transport: Transport,
        copier: Copier,
        status: Status,
        stats: ExecStats,
        arenas: Arenas,
        *,
        multicast: bool,
    ) -> None:
        self.net, self.copier, self.status, self.stats = transport, copier, status, stats
        self.arenas = arenas  # on the transport's device: "pack" and "recv" buffers
        self.rank = transport.rank
        # whether the transport opened the plan's multicast groups (else classes of several
        # receivers are sent to member by member)
        self.multicast = multicast

    def _pack(self, read: Read | None, segs: list[Segment], size: int) -> torch.Tensor:
        """The send buffer of ``segs``, packed from ``read`` -- unfilled once this rank has
        failed or its read did (the load ends at the next status check and the bytes are
        never used)."""
        buf = self.arenas.get("pack", size)
        if read is not None and not self.status.failed:
            try:
                self.copier.pack(read, segs, buf)
            except Exception as exc:
                self.status.keep(exc, "transfer")
        return buf

    def broadcast(self, number: int, bucket: Bucket, read: Read | None, what: str) -> None:
        """Every rank's layout of a broadcast bucket is the same, and so are its
        :func:`wire_messages`: one broadcast each. A receiver takes a large part that fills a
        contiguous region of its destination unchanged straight there (no copy)."""
        segs, size = self.copier.segments(number, self.rank)
        messages = wire_messages(segs, size)
        if bucket.reader == self.rank:
            buf = self._broadcast_buffer(read, segs, size)
            for message in messages:
                part = buf[message.start : message.end]
                self.net.broadcast(part, bucket.reader, what)
            self.stats.bytes_sent += size * (self.net.world_size - 1)
            if read is not None:
                self.status.guard(lambda: self.copier.deliver(segs, buf))
            return
        self._receive(messages, size, lambda into: self.net.broadcast(into, bucket.reader, what))
        self.stats.bytes_received += size

    def _broadcast_buffer(self, read: Read | None, segs: list[Segment], size: int) -> torch.Tensor:
        """The reader's send buffer of a broadcast bucket: the read buffer itself when its
        layout is the wire layout (no copy), else packed (unfilled after a failed read)."""
        if read is None:  # the read failed: keep to the schedule, the bytes are moot
            return self._pack(None, segs, size)
        buffer = read.staged()
        same = all(
            s.dtype == read.slots[s.item].dtype
            and not s.part.transposed
            and s.part.src == read.slots[s.item].part.src
            and s.offset == read.slots[s.item].offset
            for s in segs
        ) and len(segs) == len(read.slots)
        if same and buffer.device == self.net.device and buffer.numel() == size:
            return buffer  # the read layout is the wire layout: no copy
        if same:
            buf = self.arenas.get("pack", size)
            buf.copy_(buffer, non_blocking=True)
            return buf
        return self._pack(read, segs, size)

    def p2p(self, number: int, bucket: Bucket, read: Read | None, what: str) -> None:
        """Each class of receivers gets its packed parts once. A class of several ranks is a
        multicast when the transport opened its group: the reader sends to the class's root
        (or is the root), which broadcasts inside the class; otherwise every member is sent
        the same packed buffer point to point. The reader sends to other classes first and
        broadcasts within its own class last, so no rank waits on a rank that waits on it."""
        if bucket.reader == self.rank:
            self._send_classes(number, bucket, read, what)
            if read is not None:
                self.status.guard(lambda: self.copier.own_parts(number, read))
            return
        members = next((c for c in bucket.classes if self.rank in c), ())
        if not members:
            return
        segs, size = self.copier.segments(number, self.rank)
        self.stats.bytes_received += size
        if not (self.multicast and len(members) > 1):
            messages = wire_messages(segs, size)
            where = f"{what}: receiving"
            self._receive(messages, size, lambda into: self.net.recv(into, bucket.reader, where))
            return
        buf = self.arenas.get("recv", size)
        root = members[0]
        where = f"{what}: multicast within ranks {list(members)} from rank {root}"
        if root == self.rank:  # the relay: the reader is not a member of this class
            self.net.recv(buf, bucket.reader, f"{what}: receiving")
            self.net.group_broadcast(buf, members, root, where)
            self.stats.bytes_sent += size * (len(members) - 1)
        else:
            self.net.group_broadcast(buf, members, root, where)
        self.status.guard(lambda: self.copier.deliver(segs, buf))

    def _receive(
        self, messages: list[Message], size: int, take: Callable[[torch.Tensor], None]
    ) -> None:
        """Receive a packed layout of ``size`` bytes in its :func:`wire_messages`, each by
        ``take(buffer)``: a large part that fills a contiguous region of its destination
        unchanged lands there (no copy), every other message in the receive buffer, copied
        into place after."""
        buf: torch.Tensor | None = None
        rest: list[Segment] = []
        for message in messages:
            into = None
            if message.alone and not self.status.failed:
                into = self.copier.landing(message.parts[0], self.net.device)
            if into is None:
                if buf is None:
                    buf = self.arenas.get("recv", size)
                into = buf[message.start : message.end]
                rest.extend(message.parts)
            take(into)
        if buf is not None:
            received = buf
            self.status.guard(lambda: self.copier.deliver(rest, received))

    def _send_classes(self, number: int, bucket: Bucket, read: Read | None, what: str) -> None:
        """The reader's side of a p2p bucket: every other class, then its own class."""
        own: tuple[int, ...] = ()
        for members in bucket.classes:
            if self.rank in members:
                own = members
                continue
            segs, size = self.copier.segments(number, members[0])
            if self.multicast and len(members) > 1:  # to the class's root, which relays
                buf = self._pack(read, segs, size)
                self.net.send(buf, members[0], f"{what}: sending to rank {members[0]}")
                self.stats.bytes_sent += size
            else:
                self._send(members, read, segs, size, what)
        if len(own) > 1:
            segs, size = self.copier.segments(number, self.rank)
            if self.multicast:
                buf = self._pack(read, segs, size)
                self.net.group_broadcast(
                    buf, own, self.rank, f"{what}: multicast to ranks {list(own)}"
                )
                self.stats.bytes_sent += size * (len(own) - 1)
            else:
                self._send(own[1:], read, segs, size, what)

    def _send(
        self, peers: tuple[int, ...], read: Read | None, segs: list[Segment], size: int, what: str
    ) -> None:
        """Send one packed layout to each of ``peers`` in its :func:`wire_messages` (what
        :meth:`_receive` expects): a large part that lies contiguous in the read buffer goes
        as it lies there, the others packed first."""
        messages = wire_messages(segs, size)
        sends = self._message_buffers(read, messages, size)
        for peer in peers:
            for buf in sends:
                self.net.send(buf, peer, f"{what}: sending to rank {peer}")
            self.stats.bytes_sent += size

    def _message_buffers(
        self, read: Read | None, messages: list[Message], size: int
    ) -> list[torch.Tensor]:
        """The buffer of each message: a large part's bytes in ``read`` where they lie
        contiguous, else its place in the pack buffer (packed once for all of them)."""
        stored: dict[int, torch.Tensor] = {}
        if read is not None and not self.status.failed:
            for i, message in enumerate(messages):
                run = (
                    self.copier.stored_run(read, message.parts[0], self.net.device)
                    if message.alone
                    else None
                )
                if run is not None:
                    stored[i] = run
        if len(stored) == len(messages):
            return list(stored.values())
        packed = [p for i, m in enumerate(messages) if i not in stored for p in m.parts]
        buf = self._pack(read, packed, size)
        return [stored.get(i, buf[m.start : m.end]) for i, m in enumerate(messages)]


class ShmBuckets:
    """Shared buckets through same-node shared memory: the reader's slot, copied by all."""

    def __init__(
        self,
        shm: ShmExchange,
        copier: Copier,
        status: Status,
        stats: ExecStats,
    ) -> None:
        self.shm, self.copier, self.status, self.stats = shm, copier, status, stats
        self.rank = copier.rank

    def bucket(self, number: int, bucket: Bucket, read: Read | None) -> None:
        """Take part in shared bucket ``number`` (``read``: this rank's read, as its reader)."""
        whole = (
            self.copier.whole_layout(bucket, everyone=True) if bucket.kind == "broadcast" else None
        )
        if bucket.reader == self.rank:
            if read is not None:  # (a failed read was published as failed, and is pending)
                self._as_reader(number, bucket, read, whole)
            return
        if whole is not None:
            size = whole.size
        else:
            segs, size = self.copier.segments(number, self.rank)
            if not segs:
                return  # nothing to copy
        if self.status.failed:
            return  # this rank failed: its copies are moot
        if not self.shm.await_bucket(number, bucket.reader):
            return  # the reader failed to read it: it shares why at the next status check
        slot = self.shm.slot_of[number]
        if whole is not None:
            peer_view = self.shm.peer(bucket.reader, slot, whole.size)
            self.status.guard(lambda: self.copier.copy_whole(whole, peer_view))
        else:
            slots, total = read_slots(self.copier.plan, bucket)
            peer = Read(bucket, buffer=self.shm.peer(bucket.reader, slot, total))
            peer.slots = {s.item: s for s in slots}
            self.status.guard(lambda: self.copier.own_parts(number, peer))
        self.stats.bytes_received += size

    def _as_reader(
        self, number: int, bucket: Bucket, read: Read, whole: WholeLayout | None
    ) -> None:
        """The reader copies its own parts; its figures count what its peers take."""
        if whole is not None:
            self.status.guard(lambda: self.copier.copy_whole(whole, read.staged()))
        else:
            self.status.guard(lambda: self.copier.own_parts(number, read))
        self.stats.bytes_sent += self.copier.peers_take(number, bucket, whole)
