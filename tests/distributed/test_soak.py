"""Long runs: 50 loads in a row in one process group leave nothing behind and do not slow."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.cases import LLAMA_RULES, MIXED_RULES
from tests.distributed.launch import check_all_ok, run_group

pytestmark = pytest.mark.timeout(400)
ROUNDS = 50


def test_fifty_loads_in_a_row(mixed_ckpt: Path, llama_ckpt: Path, single_file_ckpt: Path) -> None:
    configs = [
        {"source": str(mixed_ckpt)},
        {"source": str(mixed_ckpt), "rules": MIXED_RULES, "bucket_bytes": 5000},
        {"source": str(llama_ckpt), "rules": LLAMA_RULES, "dtype": "float32"},
        {"source": str(single_file_ckpt), "out": True},
        {"source": str(mixed_ckpt), "rules": MIXED_RULES, "dtype": "bfloat16", "out": True},
    ]
    results = check_all_ok(
        run_group(2, "many_loads", {"configs": configs, "rounds": ROUNDS}, timeout=380)
    )
    for r in results:
        warm = len(configs)  # after one round of every config, nothing may keep growing
        drift = max(r["rss"][warm:]) - r["rss"][warm - 1]
        assert drift < 16 * 2**20, f"private memory grew by {drift / 2**20:.1f} MiB"
        # no leaked file handles or threads: never more than during the first round
        # (a transient descriptor may come and go, so compare with the first round's maximum)
        assert max(r["fds"][warm:]) <= max(r["fds"][:warm]), r["fds"]
        assert max(r["threads"][warm:]) <= max(r["threads"][:warm]), r["threads"]
        # No slowdown: compare each config's fastest early load with its fastest late load.
        # Contention from other test processes only ever adds time, so the minimum over a
        # window is the load's own cost; a leak that grows per load raises every late sample.
        for c in range(len(configs)):
            own = r["seconds"][c::warm]
            early, late = min(own[1:5]), min(own[-4:])
            assert late <= 2 * early + 0.05, (c, own)
