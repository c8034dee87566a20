"""The executor's reader thread on one process: buckets whose pieces are read straight into
their destinations need no staging arena, so the reader runs ahead through them."""

from __future__ import annotations

import dataclasses
import queue
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distload.arenas import Arenas
from distload.checkpoint import read_checkpoint
from distload.errors import CheckpointError
from distload.execute import PREFETCH_DEPTH, Executor, Read, ReadAhead, ReadFailure
from distload.execute import reader as reader_module
from distload.geometry import segments_for, wire_messages
from distload.materialize import prepare_destinations
from distload.plan import LoadPlan
from distload.planner import DEFAULT_BUCKET_BYTES, make_plan
from distload.storage import FileReader, ReadRequest
from distload.synthetic import LlamaShape, write_llama
from distload.transport.local import LocalTransport

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("ckpt"), LlamaShape(), max_shard_bytes=100_000)


def _one_rank(
    plan: LoadPlan,
    dests: dict[int, torch.Tensor],
    reader: FileReader,
    arenas: Arenas,
    *,
    inline: bool = False,
) -> tuple[Executor, ReadAhead]:
    """A one-process executor (for its copier) and the read-ahead of its buckets."""
    executor = Executor(
        plan,
        LocalTransport(),
        dests,
        reader,
        host_arenas=arenas,
        comm_arenas=arenas,
    )
    prefetch = ReadAhead(
        plan,
        0,
        reader=reader,
        arenas=arenas,
        direct_targets=executor.copier.direct_targets,
        inline=inline,
    )
    return executor, prefetch


def test_direct_buckets_are_read_ahead_without_waiting_for_arenas(ckpt: Path) -> None:
    index = read_checkpoint(ckpt)
    plan = make_plan(index, 1, bucket_bytes=8192)  # one process: every bucket is local
    assert len(plan.buckets) > 4 * PREFETCH_DEPTH
    dests = prepare_destinations(plan, 0, torch.device("cpu"), None)
    arenas = Arenas(torch.device("cpu"))
    with FileReader(ckpt, threads=2) as reader:
        _, prefetch = _one_rank(plan, dests, reader, arenas)
        try:
            # nothing is ever released: a bucket needing an arena would block after
            # PREFETCH_DEPTH of them; direct buckets all come through
            got = [prefetch.next(b) for b in plan.buckets]
        finally:
            prefetch.stop()
    assert all(isinstance(r, Read) and r.arena is None and r.buffer is None for r in got)
    expected: dict[str, torch.Tensor] = {}
    for f in index.files:
        expected.update(load_file(ckpt / f.name))
    for out, dest in dests.items():
        name = plan.outputs[out].name
        assert torch.equal(dest.view(torch.uint8), expected[name].view(torch.uint8)), name


def test_read_ahead_announces_only_ranges_of_files_not_in_the_page_cache(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader_module, "DIRECT_BATCH_BYTES", 1)  # one bucket per read
    index = read_checkpoint(ckpt)
    assert len(index.files) >= 2
    resident = index.files[0].name
    plan = dataclasses.replace(make_plan(index, 1, bucket_bytes=8192), cached_files=(resident,))
    dests = prepare_destinations(plan, 0, torch.device("cpu"), None)
    arenas = Arenas(torch.device("cpu"))
    advised: list[tuple[str, int, int]] = []
    with FileReader(ckpt, threads=2) as reader:
        reader.advise = lambda file, offset, length: advised.append((file, offset, length))  # type: ignore[method-assign]
        executor = Executor(
            plan, LocalTransport(), dests, reader, host_arenas=arenas, comm_arenas=arenas
        )
        prefetch = ReadAhead(
            plan, 0, reader=reader, arenas=arenas, direct_targets=executor.copier.direct_targets
        )
        try:
            for b in plan.buckets:
                prefetch.next(b)
        finally:
            prefetch.stop()
    files = {plan.tensors[i.tensor].file for b in plan.buckets[1:] for i in b.items}
    assert {f for f, _, _ in advised} == files - {resident}  # the others' ranges all announced
    assert all(length > 0 for _, _, length in advised)


def _read_all(
    ckpt: Path, bucket_bytes: int, fail_tensor: str | None = None
) -> tuple[list[object], int, dict[int, torch.Tensor], object]:
    """Every bucket of a one-process plan through the read-ahead: the outcomes, how many
    reads the pool was handed, the destinations and the plan."""
    plan = make_plan(read_checkpoint(ckpt), 1, bucket_bytes=bucket_bytes)
    dests = prepare_destinations(plan, 0, torch.device("cpu"), None)
    arenas = Arenas(torch.device("cpu"))
    calls: list[int] = []
    with FileReader(ckpt, threads=2) as reader:
        real = reader.read

        def counted(requests: list[ReadRequest]) -> None:
            calls.append(len(requests))
            if fail_tensor is not None and any(r.tensor == fail_tensor for r in requests):
                raise CheckpointError(f"injected failure reading {fail_tensor}", file="x")
            real(requests)

        reader.read = counted  # type: ignore[method-assign]
        executor = Executor(
            plan, LocalTransport(), dests, reader, host_arenas=arenas, comm_arenas=arenas
        )
        prefetch = ReadAhead(
            plan, 0, reader=reader, arenas=arenas, direct_targets=executor.copier.direct_targets
        )
        try:
            got: list[object] = [prefetch.next(b) for b in plan.buckets]
        finally:
            prefetch.stop()
    return got, len(calls), dests, plan


def test_consecutive_direct_buckets_are_read_in_one_pass_up_to_the_batch_bound(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got, reads, dests, plan = _read_all(ckpt, 8192)
    assert len(plan.buckets) > 8 and reads < len(plan.buckets) / 4  # batched
    assert all(isinstance(r, Read) and r.all_direct for r in got)
    expected: dict[str, torch.Tensor] = {}
    for f in read_checkpoint(ckpt).files:
        expected.update(load_file(ckpt / f.name))
    for out, dest in dests.items():
        name = plan.outputs[out].name
        assert torch.equal(dest.view(torch.uint8), expected[name].view(torch.uint8)), name
    monkeypatch.setattr(reader_module, "DIRECT_BATCH_BYTES", 3 * 8192)
    _, bounded, _, _ = _read_all(ckpt, 8192)
    assert bounded > reads  # a smaller bound: more passes, each within it


def test_a_failed_batched_read_is_every_bucket_of_the_batch(ckpt: Path) -> None:
    plan = make_plan(read_checkpoint(ckpt), 1, bucket_bytes=8192)
    victim = plan.tensors[plan.buckets[len(plan.buckets) // 2].items[0].tensor].name
    got, _, _, plan = _read_all(ckpt, 8192, fail_tensor=victim)
    failed = [n for n, r in enumerate(got) if isinstance(r, ReadFailure)]
    assert failed and all(isinstance(r, Read) for n, r in enumerate(got) if n not in failed)
    hit = [
        n
        for n, b in enumerate(plan.buckets)
        if any(plan.tensors[i.tensor].name == victim for i in b.items)
    ]
    assert set(hit) <= set(failed)  # the bucket holding the tensor, with its batch
    assert all("injected failure" in str(got[n].error) for n in failed)  # type: ignore[attr-defined]


class _NoBlockingGets(queue.Queue):  # type: ignore[type-arg]
    """A queue that records blocking gets made once its owner is stopping."""

    def __init__(self, stopping: threading.Event) -> None:
        super().__init__()
        self.stopping, self.blocking = stopping, 0

    def get(self, block: bool = True, timeout: float | None = None) -> object:
        if block and self.stopping.is_set():
            self.blocking += 1
        return super().get(block, timeout)


def test_stop_waits_on_the_reader_thread_never_on_its_queue(ckpt: Path) -> None:
    # a reader thread still ending after its last bucket must not hold stop() up for a
    # wait on a queue nothing more will arrive in
    plan = make_plan(read_checkpoint(ckpt), 1, bucket_bytes=8192)
    dests = prepare_destinations(plan, 0, torch.device("cpu"), None)
    arenas = Arenas(torch.device("cpu"))
    with FileReader(ckpt, threads=2) as reader:
        executor = Executor(
            plan, LocalTransport(), dests, reader, host_arenas=arenas, comm_arenas=arenas
        )
        gate, queued = threading.Event(), threading.Event()
        real_run = ReadAhead._run

        def lingering(self: ReadAhead) -> None:
            real_run(self)
            queued.set()
            gate.wait(5)  # alive after queueing its last outcome

        ReadAhead._run = lingering  # type: ignore[method-assign]
        try:
            prefetch = ReadAhead(
                plan, 0, reader=reader, arenas=arenas, direct_targets=executor.copier.direct_targets
            )
        finally:
            ReadAhead._run = real_run  # type: ignore[method-assign]
        assert queued.wait(10)
        ready = _NoBlockingGets(prefetch._stop)
        while not prefetch.ready.empty():
            ready.put(prefetch.ready.get())
        prefetch.ready = ready
        got = [prefetch.next(b) for b in plan.buckets[:-1]]  # the last one left queued
        threading.Timer(0.2, gate.set).start()
        prefetch.stop()
    assert all(isinstance(r, Read) for r in got)
    assert not prefetch.thread.is_alive() and ready.blocking == 0


@pytest.mark.parametrize("shm", [False, True], ids=["transport", "shared-memory"])
def test_execute_phase_over_three_ranks_is_bit_exact(mixed_ckpt: Path, shm: bool) -> None:
    """The whole execute phase (materialise, read, exchange, copy, close) on three
    thread-ranks: every rank's pieces equal safetensors reads, each byte read once."""
    from distload.execute import ExecutePhase
    from distload.materialize import prepare_destinations
    from distload.placement import TensorParallel
    from tests.distributed.cases import MIXED_RULES, tp_rules
    from tests.reference import expected_local, read_all, same_bits
    from tests.threads import ThreadTransport, run_threads

    index = read_checkpoint(mixed_ckpt)
    placement = TensorParallel(tp_rules(MIXED_RULES))
    plan = make_plan(index, 3, placement, bucket_bytes=16_384, nodes=[0, 0, 0], token=f"t{shm}")

    def rank(net: ThreadTransport) -> tuple[dict[int, torch.Tensor], int]:
        with ExecutePhase(plan, net, shm=shm, timeout=20) as phase:
            dests = phase.materialize(
                lambda: prepare_destinations(plan, net.rank, net.device, None)
            )
            result = phase.run(dests, root=index.root, contain=None, read_threads=2, on_bucket=None)
        assert result.exchange == ("shared memory" if shm else "point to point")
        return dests, result.stats.bytes_read

    got = run_threads(3, rank)
    assert not [g for g in got if isinstance(g, BaseException)], got
    assert sum(read for _, read in got) == index.total_bytes  # each byte read once
    full = read_all(mixed_ckpt)
    for r, (dests, _) in enumerate(got):
        for out, dest in dests.items():
            name = plan.outputs[out].name
            want = expected_local(full[name], name, MIXED_RULES, 3, r, None)
            assert same_bits(dest, want), (r, name)


def test_execute_phase_shares_a_read_failure_with_every_rank(mixed_ckpt: Path) -> None:
    """A reader rank whose read fails: every rank raises the same error, none hangs."""
    from distload.errors import DistLoadError
    from distload.execute import ExecutePhase
    from distload.materialize import prepare_destinations
    from tests.threads import ThreadTransport, run_threads

    index = read_checkpoint(mixed_ckpt)
    plan = make_plan(index, 2, bucket_bytes=16_384, nodes=[0, 0])

    def rank(net: ThreadTransport) -> None:
        root = index.root if net.rank == 0 else "/nonexistent-root"  # rank 1 cannot read
        with ExecutePhase(plan, net, shm=False, timeout=20) as phase:
            dests = phase.materialize(
                lambda: prepare_destinations(plan, net.rank, net.device, None)
            )
            phase.run(dests, root=root, contain=None, read_threads=2, on_bucket=None)

    got = run_threads(2, rank)
    assert all(isinstance(e, DistLoadError) for e in got), got
    assert all(1 in e.ranks for e in got)


@pytest.fixture(scope="module")
def large_parts_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tensors whose sharded parts are over a megabyte (their own point-to-point messages),
    beside small ones that travel packed."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(7)
    tensors = {
        "cols.weight": torch.randn(512, 4096, generator=gen).to(torch.bfloat16),  # 4 MiB
        "rows.weight": torch.randn(1536, 1024, generator=gen).to(torch.bfloat16),  # 3 MiB
        "norm.weight": torch.randn(4096, generator=gen).to(torch.bfloat16),
        "embed.weight": torch.randn(1024, 1024, generator=gen).to(torch.bfloat16),  # replicated
        "small.weight": torch.randn(48, 64, generator=gen).to(torch.bfloat16),
    }
    folder = tmp_path_factory.mktemp("large-parts")
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


LARGE_PARTS_RULES = [
    ["cols.weight", ["shard", 1]],
    ["rows.weight", ["shard", 0]],
    ["small.weight", ["shard", 1]],
]


@pytest.mark.parametrize(
    ("dtype", "bucket"),
    [(None, None), (None, 1 << 20), ("float32", None)],
    ids=["stored", "stored-1mib-buckets", "upcast"],
)
def test_large_parts_travel_straight_into_their_destinations(
    large_parts_ckpt: Path, dtype: str | None, bucket: int | None
) -> None:
    """Rank 0 reads everything and serves the others (point to point, and a broadcast for
    the replicated tensors): a part of a megabyte or more is a message of its own, sent from
    where it lies when it is contiguous there (rows, whole tensors) and received straight
    into its destination, so the only CPU copies left are rank 0's packing of column blocks
    and its own parts -- one per delivered byte. With a cast on
    the receiving side, parts land in the receive buffer and are copied as before. Buckets
    of one large tensor each make messages that do not start at the layout's first byte."""
    from distload.execute import ExecutePhase
    from distload.placement import TensorParallel
    from tests.distributed.cases import tp_rules
    from tests.reference import expected_local, read_all, same_bits
    from tests.threads import ThreadTransport, run_threads

    index = read_checkpoint(large_parts_ckpt)
    placement = TensorParallel(tp_rules(LARGE_PARTS_RULES))
    stored = {"float32": "F32"}.get(dtype or "")
    plan = make_plan(
        index,
        3,
        placement,
        readers=[0],
        nodes=[0, 0, 0],
        dtype=stored,
        bucket_bytes=bucket or DEFAULT_BUCKET_BYTES,
        token=f"large-{dtype}-{bucket}",
    )
    assert any(b.kind == "p2p" for b in plan.buckets)
    if bucket is not None:  # some bucket is one large part, after padding in its layout
        assert any(
            len(ms) == 1 and ms[0].alone and (ms[0].start, ms[0].end) != (0, size)
            for b in plan.buckets
            if b.kind != "local"
            for segs, size in [segments_for(plan, b, 1)]
            for ms in [wire_messages(segs, size)]
        )

    def rank(net: ThreadTransport) -> tuple[dict[int, torch.Tensor], int, int]:
        with ExecutePhase(plan, net, shm=False, timeout=20) as phase:
            dests = phase.materialize(
                lambda: prepare_destinations(plan, net.rank, net.device, None)
            )
            result = phase.run(dests, root=index.root, contain=None, read_threads=2, on_bucket=None)
        return dests, result.stats.bytes_copied, result.stats.bytes_received

    got = run_threads(3, rank)
    assert not [g for g in got if isinstance(g, BaseException)], got
    full = read_all(large_parts_ckpt)
    want_dtype = getattr(torch, dtype) if dtype else None
    held = []
    for r, (dests, _, _) in enumerate(got):
        for out, dest in dests.items():
            name = plan.outputs[out].name
            want = expected_local(full[name], name, LARGE_PARTS_RULES, 3, r, want_dtype)
            assert same_bits(dest, want), (r, name)
        held.append(sum(d.numel() * d.element_size() for d in dests.values()))
    copied = [c for _, c, _ in got]
    small = sum(t.nbytes for t in index.tensors if t.nbytes < 1 << 20)
    if bucket is not None:  # column blocks of 1 MiB pieces are small parts: packed
        assert sum(copied) <= sum(held)
    elif dtype is None:
        # receivers copy only what came packed (the small tensors' parts), rank 0 its own
        # parts and the column blocks it packed for the others
        cols = next(t.nbytes for t in index.tensors if t.name == "cols.weight")
        assert copied[0] <= held[0] + cols
        assert all(c <= small for c in copied[1:]), copied
        assert sum(copied) <= sum(held)
    else:
        # cast after receiving (bf16 travels, float32 lands): every received byte is copied
        assert all(c >= received for (_, c, received) in got[1:]), got


@pytest.mark.parametrize("dtype", [None, "F32"], ids=["straight", "staged-cast"])
def test_inline_reads_need_no_thread_and_read_each_bucket_when_asked(
    ckpt: Path, dtype: str | None
) -> None:
    """Inline, the read-ahead starts no thread and the reader no pool: buckets are read on the
    asking thread, in plan order (consecutive direct ones in one pass), straight into
    destinations or (a cast) into a staging arena given back before the next bucket; the
    copies end bit for bit."""
    index = read_checkpoint(ckpt)
    plan = make_plan(index, 1, bucket_bytes=8192, dtype=dtype)
    dests = prepare_destinations(plan, 0, torch.device("cpu"), None)
    arenas = Arenas(torch.device("cpu"))
    before = threading.active_count()
    with FileReader(ckpt, threads=0) as reader:
        executor, prefetch = _one_rank(plan, dests, reader, arenas, inline=True)
        try:
            assert prefetch.ready.empty() and reader.bytes_read == 0  # nothing before asked
            for number, bucket in enumerate(plan.buckets):
                outcome = prefetch.next(bucket)
                assert isinstance(outcome, Read)
                executor.copier.own_parts(number, outcome)
                prefetch.release(outcome)
                assert threading.active_count() == before
        finally:
            prefetch.stop()
    assert not prefetch.thread.is_alive()
    expected: dict[str, torch.Tensor] = {}
    for f in index.files:
        expected.update(load_file(ckpt / f.name))
    for out, dest in dests.items():
        want = expected[plan.outputs[out].name]
        want = want.to(dest.dtype) if want.is_floating_point() else want
        assert torch.equal(dest, want), plan.outputs[out].name


def test_inline_reads_when_nothing_moves_and_ranks_fill_the_cores(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank reads on its main thread only when every shared bucket comes from the page
    cache (no transfer to overlap) and its node runs at least as many ranks as it has cores;
    DISTLOAD_INLINE_READS decides instead when set."""
    from distload.execute.run import inline_reads

    plan = make_plan(read_checkpoint(ckpt), 4, bucket_bytes=8192, nodes=[0, 0, 1, 1])
    shared = frozenset(n for n, b in enumerate(plan.buckets) if b.kind != "local")
    assert shared
    monkeypatch.delenv("DISTLOAD_INLINE_READS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert inline_reads(plan, 0, shared, shm=False)  # 2 ranks on 2 cores, all cached
    assert not inline_reads(plan, 0, frozenset(), shm=False)  # buckets move: overlap
    assert not inline_reads(plan, 0, shared, shm=True)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert not inline_reads(plan, 0, shared, shm=False)  # a core to spare per rank
    monkeypatch.setenv("DISTLOAD_INLINE_READS", "1")
    assert inline_reads(plan, 0, frozenset(), shm=False)
    monkeypatch.setenv("DISTLOAD_INLINE_READS", "0")
    assert not inline_reads(plan, 0, shared, shm=False)
