"""A rank that never arrives while the process group is set up is named by the others,
within the rendezvous timeout, instead of a raw store timeout after the load's timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.launch import check_all_ok, run_group
from tests.distributed.matrix_table import record_case

pytestmark = pytest.mark.timeout(120)
ENV = {"DISTLOAD_RENDEZVOUS_TIMEOUT": "4"}


def test_a_rank_that_never_joins_is_named(llama_ckpt: Path) -> None:
    args = {"source": str(llama_ckpt), "absent": [2]}
    got = check_all_ok(run_group(3, "absent_rank_load", args, bootstrap="env", extra_env=ENV))
    assert got[2] == {"absent": True}
    record_case("rank 2 never joins the rendezvous (wait 4 s)", got, victim=2)
    for err in got[:2]:
        assert err["type"] == "PeerError" and err["phase"] == "runtime", err
        assert err["ranks"] == [2], err
        assert "rank(s) [2] of 3 never joined the process group" in err["message"], err
        assert err["seconds"] < 4 + 10, err


def test_a_missing_rank_zero_is_named(llama_ckpt: Path) -> None:
    args = {"source": str(llama_ckpt), "absent": [0]}
    got = check_all_ok(run_group(3, "absent_rank_load", args, bootstrap="env", extra_env=ENV))
    record_case("rank 0 (the rendezvous host) never starts (wait 4 s)", got, victim=0)
    for err in got[1:]:
        assert err["type"] == "PeerError" and err["phase"] == "runtime", err
        assert err["ranks"] == [0] and "cannot reach the rendezvous" in err["message"], err
        assert err["seconds"] < 4 + 10, err
