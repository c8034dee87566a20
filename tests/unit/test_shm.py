"""The shared-memory exchange's protocol (``distload.shm``), driven from one process: slots
refilled only once every rank is done, published and failed buckets, and waits that end with a
PeerError naming the rank when it aborted, died or stayed silent past the timeout."""

from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
from pathlib import Path

import pytest

from distload.errors import PeerError
from distload.placement import ReplicateAll
from distload.plan import LoadPlan
from distload.planner import make_plan
from distload.shm import _WAIT_READER, SLOTS, ShmExchange
from tests.plans import index_of

pytestmark = pytest.mark.timeout(60)


def _plan(world: int = 2) -> LoadPlan:
    index = index_of([((32, 16), "BF16")] * 12)  # 1 KiB each: one tensor per bucket
    plan = make_plan(index, world, ReplicateAll(), bucket_bytes=1024)
    assert all(b.kind == "broadcast" for b in plan.buckets)
    return plan


def _group(tmp_path: Path, world: int, timeout: float) -> list[ShmExchange]:
    plan = _plan(world)
    ranks = [ShmExchange(plan, r, folder=tmp_path, timeout=timeout) for r in range(world)]
    for ex in ranks:
        ex.attach()
    for ex in ranks:
        ex.unlink_own()
    assert not list(tmp_path.iterdir())  # the memory lives on in the mappings only
    return ranks


def _pair(tmp_path: Path, timeout: float = 5.0) -> tuple[ShmExchange, ShmExchange]:
    ex0, ex1 = _group(tmp_path, 2, timeout)
    return ex0, ex1


def _of(ex: ShmExchange, reader: int) -> list[int]:
    return [n for n, b in enumerate(ex.plan.buckets) if b.reader == reader]


def test_slot_is_refilled_only_after_every_rank_is_done(tmp_path: Path) -> None:
    ex0, ex1 = _pair(tmp_path)
    mine = _of(ex0, 0)
    assert len(mine) > SLOTS
    stop = threading.Event()
    for n in mine[:SLOTS]:  # fresh slots: no wait
        assert ex0.acquire(n, stop)
        ex0.own(ex0.slot_of[n], 4)[:] = n  # the bucket's bytes
        ex0.publish(n, ok=True)
    third = mine[SLOTS]
    assert ex0.previous[third] == mine[0]
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(ex0.acquire(third, stop)))
    waiter.start()
    # rank 1 reads the first bucket out of rank 0's slot; rank 0 is done with it, rank 1 not
    assert ex1.await_bucket(mine[0], 0)
    assert ex1.peer(0, ex1.slot_of[mine[0]], 4).tolist() == [mine[0]] * 4
    ex0.mark_done(mine[0], 0)
    # the waiting reader publishes whom it waits on: once that is rank 1 alone, it has seen
    # rank 0 done and still waits (a fact, whatever the machine's speed)
    deadline = time.monotonic() + 10
    while ex0._ctl[0][_WAIT_READER] != 1 << 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ex0._ctl[0][_WAIT_READER] == 1 << 1
    assert waiter.is_alive() and not got  # still waiting for rank 1
    ex1.mark_done(mine[0], 0)
    waiter.join(timeout=5)
    assert got == [True]
    # a stopped wait returns False instead of waiting on
    late = mine[SLOTS + 1]
    stop.set()
    assert ex0.acquire(late, stop) is False


def test_a_failed_read_is_published_as_such(tmp_path: Path) -> None:
    ex0, ex1 = _pair(tmp_path)
    first = _of(ex1, 1)[0]
    ex1.publish(first, ok=False)
    assert ex0.await_bucket(first, 1) is False


def test_waiting_on_an_aborted_rank_raises_naming_it(tmp_path: Path) -> None:
    ex0, ex1 = _pair(tmp_path)
    ex1.abort()
    start = time.monotonic()
    with pytest.raises(PeerError, match="rank 1 failed and left the load") as info:
        ex0.await_bucket(_of(ex0, 1)[0], 1)
    assert time.monotonic() - start < 2
    assert info.value.ranks == (1,) and info.value.phase == "transfer"


def test_waiting_on_a_dead_rank_raises_naming_it(tmp_path: Path) -> None:
    plan = _plan()
    ex0, ex1 = (ShmExchange(plan, r, folder=tmp_path, timeout=5.0) for r in range(2))
    gone = subprocess.Popen(["sleep", "30"])
    ex1._ctl[1][0] = gone.pid  # as if rank 1 were that process
    ex0.attach()
    gone.kill()
    gone.wait()  # exited and reaped: its process id names no process now
    with pytest.raises(PeerError, match=rf"rank 1 \(process {gone.pid}\) died"):
        ex0.await_bucket(_of(ex0, 1)[0], 1)


def test_silence_past_the_timeout_raises_naming_the_lagging_ranks(tmp_path: Path) -> None:
    ex0, _ = _pair(tmp_path, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(PeerError, match=r"no answer within 0.3 s; ranks not answering: \[1\]"):
        ex0.await_bucket(_of(ex0, 1)[0], 1)
    assert time.monotonic() - start < 2
    mine = _of(ex0, 0)
    stop = threading.Event()
    for n in mine[:SLOTS]:
        ex0.publish(n, ok=True)
        ex0.mark_done(n, 0)  # rank 0 is done with both, rank 1 never answers
    with pytest.raises(PeerError, match=r"ranks not answering: \[1\]") as info:
        ex0.acquire(mine[SLOTS], stop)
    assert info.value.ranks == (1,)


def test_close_purges_every_ranks_files(tmp_path: Path) -> None:
    plan = _plan()
    ex0 = ShmExchange(plan, 0, folder=tmp_path)
    ShmExchange(plan, 1, folder=tmp_path)  # a peer that died before cleaning up
    assert len(list(tmp_path.iterdir())) == 2 * (SLOTS + 1)  # slots and a control file each
    ex0.close(purge=True)
    assert not list(tmp_path.iterdir())


def test_status_checks_with_shared_memory_skip_broadcasts() -> None:
    plan = _plan()
    shared = [n for n, b in enumerate(plan.buckets) if b.kind != "local"]
    every = 4
    plan = dataclasses.replace(plan, check_every=every)
    assert plan.status_checks(shm=True) == frozenset(shared[every - 1 :: every])
    assert plan.status_checks() == frozenset(shared)  # over the transport: every broadcast


def test_a_timeout_names_the_rank_at_the_end_of_the_chain_of_waits(tmp_path: Path) -> None:
    """Rank 0 waits on rank 2, whose reader waits on rank 1 (stalled): rank 0 names rank 1."""
    ex0, _, ex2 = _group(tmp_path, 3, timeout=0.3)
    stop = threading.Event()
    mine = _of(ex2, 2)
    for n in mine[:SLOTS]:
        ex2.publish(n, ok=True)
        for ex in (ex0, ex2):
            ex.mark_done(n, 2)  # rank 1 never marks them
    errors: list[PeerError] = []

    def reader() -> None:
        try:
            ex2.acquire(mine[SLOTS], stop)
        except PeerError as exc:
            errors.append(exc)
            ex2.abort(exc.ranks)  # as the load does when it leaves

    thread = threading.Thread(target=reader)
    thread.start()
    # rank 0 finds the chain 0 -> 2 -> 1, or rank 2 already left blaming rank 1
    pattern = r"ranks not answering: \[1\]|rank 2 left the load, its error naming ranks \[1\]"
    with pytest.raises(PeerError, match=pattern) as info:
        ex0.await_bucket(mine[SLOTS], 2)
    thread.join(timeout=5)
    assert info.value.ranks == (1,)
    assert [e.ranks for e in errors] == [(1,)]


def test_a_rank_that_left_passes_its_blame_on(tmp_path: Path) -> None:
    ex0, _, ex2 = _group(tmp_path, 3, timeout=5.0)
    ex2.abort([1])  # rank 2 left because of rank 1
    pattern = r"rank 2 left the load, its error naming ranks \[1\]"
    with pytest.raises(PeerError, match=pattern) as info:
        ex0.await_bucket(_of(ex0, 2)[0], 2)
    assert info.value.ranks == (1,)


def test_a_peer_whose_process_cannot_be_seen_is_not_taken_for_dead(tmp_path: Path) -> None:
    """A process id this rank cannot see at attach time (another process namespace) is not
    probed: the wait ends at the timeout, not at once with 'died'."""
    plan = _plan()
    ex0, ex1 = (ShmExchange(plan, r, folder=tmp_path, timeout=0.5) for r in range(2))
    gone = subprocess.Popen(["true"])
    gone.wait()
    ex1._ctl[1][0] = gone.pid  # not a process this rank can see
    ex0.attach()
    start = time.monotonic()
    with pytest.raises(PeerError, match=r"no answer within 0\.5 s"):
        ex0.await_bucket(_of(ex0, 1)[0], 1)
    assert time.monotonic() - start >= 0.5
