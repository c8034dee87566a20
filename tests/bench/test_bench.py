"""The benchmark harness runs every available method for real and checks each bit for bit.

Tiny sizes: this checks the harness, not the speed (speed lives in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distload.bench.methods import METHODS, available

pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("bench")]


def test_bench_runs_every_method_bit_exact(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distload",
            "bench",
            "--size-mb",
            "6",
            "--shard-mb",
            "2",
            "--scenarios",
            "tp2",
            "--repeat",
            "1",
            "--staging-mb",
            "8",
            "--workdir",
            str(tmp_path),
            "--results",
            str(tmp_path / "RESULTS.md"),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "RESULTS.md").read_text()
    rows: dict[str, list[str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in METHODS:
            rows[cells[0]] = cells
    expected = {m for m in METHODS if available(m)}
    assert set(rows) == expected, table
    for method, cells in rows.items():
        assert cells[6] == "True", (method, table)  # bit exact
    assert float(rows["distload"][5]) == pytest.approx(1.0, abs=0.3)  # read ~once
    assert "storage limit" in table
