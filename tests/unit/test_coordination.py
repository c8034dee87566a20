"""Exception-robust collectives: a failure on one rank is raised, the same, on every rank."""

from __future__ import annotations

import pytest

from distload.coordination import agree, from_coordinator, gather_or_fail
from distload.errors import CheckpointError, DistLoadError
from tests.threads import ThreadTransport, run_threads

pytestmark = pytest.mark.timeout(60)


def test_agree_passes_when_no_rank_failed() -> None:
    assert run_threads(3, lambda net: agree(net, "plan", None)) == [None, None, None]


def test_agree_raises_the_same_error_on_every_rank() -> None:
    def step(net: ThreadTransport) -> None:
        error = ValueError("shape 3 != 4") if net.rank == 2 else None
        agree(net, "materialize", error)

    got = run_threads(3, step)
    assert all(isinstance(e, DistLoadError) for e in got)
    assert {str(e) for e in got} == {str(got[0])}  # one message on every rank
    assert all(e.ranks == (2,) and e.phase == "materialize" for e in got)
    assert "shape 3 != 4" in str(got[0]) and "rank 2" in str(got[0])


def test_from_coordinator_shares_the_result_or_the_failure() -> None:
    assert (
        run_threads(3, lambda net: from_coordinator(net, "index", lambda: b"plan")) == [b"plan"] * 3
    )

    def bad() -> bytes:
        raise CheckpointError("x.safetensors: truncated", file="x.safetensors")

    got = run_threads(3, lambda net: from_coordinator(net, "index", bad))
    assert all(isinstance(e, DistLoadError) and e.ranks == (0,) for e in got)
    assert all("x.safetensors: truncated" in str(e) and e.phase == "index" for e in got)


def test_gather_or_fail_gathers_or_names_every_failing_rank() -> None:
    assert (
        run_threads(2, lambda net: gather_or_fail(net, "close", lambda: bytes([net.rank])))
        == [[b"\x00", b"\x01"]] * 2
    )

    def fn(net: ThreadTransport) -> list[bytes]:
        def mine() -> bytes:
            if net.rank:
                raise RuntimeError(f"rank {net.rank} broke")
            return b"ok"

        return gather_or_fail(net, "close", mine)

    got = run_threads(3, fn)
    assert all(isinstance(e, DistLoadError) and e.ranks == (1, 2) for e in got)
