"""The benchmark harness runs every available method for real and checks each bit for bit.

Tiny sizes: this checks the harness, not the speed (speed lives in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
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
            "tp2,dp2",
            "--cache",
            "cold,warm",
            "--rounds",
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
    expected = {m for m in METHODS if available(m)}
    for scenario in ("tp2 cold", "tp2 warm", "dp2 cold", "dp2 warm"):
        section = table.split(f"## {scenario}\n", 1)[1].split("\n## ", 1)[0]
        rows: dict[str, list[str]] = {}
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 6 and cells[0] in METHODS:
                rows[cells[0]] = cells
        assert set(rows) == expected, table
        for method, cells in rows.items():
            assert cells[5] == "True", (method, table)  # bit exact
            if method != "floor":  # (the floor of 6 MB takes a few ms: 0.00 s at 2 digits)
                assert float(cells[2].split()[0]) > 0, (method, table)  # CPU seconds measured
        if scenario.endswith("cold"):
            assert float(rows["distload"][4]) == pytest.approx(1.0, abs=0.3)  # read ~once
        ratios = section.split("fastest alternative per round: ", 1)[1].split(" (")[0]
        assert len(ratios.split(", ")) == 1, section  # one round: one pair
        assert "fastest: `floor`" not in section  # the floor is a limit, not an alternative
        assert "Over the floor" in section and "`distload` time" in section, section
    summary = table.split("## Summary\n", 1)[1].split("\n## ", 1)[0]
    for scenario in ("tp2 cold", "tp2 warm", "dp2 cold", "dp2 warm"):
        assert f"| {scenario} |" in summary, summary
    assert "machine limits, same run" in table and "command: `distload bench" in table
    assert "CPU s per GB through the page cache" in table
    assert "O_DIRECT readers" in table or "O_DIRECT refused here" in table


def test_ratios_are_taken_pair_by_pair() -> None:
    """Each round's distload time over that same round's fastest alternative (not a ratio of
    medians): a slow round of the machine falls on both sides of its pair."""
    from distload.bench.tables import pairwise, spread

    figures = {
        "distload": {"seconds": [1.0, 3.0, 1.2], "cpu": [2.0, 2.0, 2.0]},
        "get_slice": {"seconds": [2.0, 6.0, 1.0], "cpu": [1.0, 1.0, 4.0]},
        "load_file": {"seconds": [4.0, 5.0, 3.0], "cpu": [1.0, 1.0, 1.0]},
        "floor": {"seconds": [0.5, 0.5, 0.5], "cpu": [0.5, 0.5, 0.5]},  # a limit, no rival
    }
    ratios, cpu, fastest = pairwise(figures)
    assert ratios == [0.5, 0.6, 1.2]
    assert cpu == [2.0, 2.0, 0.5]
    assert fastest == {"get_slice": 2, "load_file": 1}
    assert spread(ratios) == "0.60 [0.50-1.20]"


def test_every_method_is_set_against_the_floor_pair_by_pair() -> None:
    from distload.bench.tables import against_floor

    figures = {
        "distload": {"seconds": [1.0, 3.0], "cpu": [2.0, 2.0]},
        "get_slice": {"seconds": [2.0, 6.0], "cpu": [1.0, 4.0]},
        "floor": {"seconds": [0.5, 2.0], "cpu": [1.0, 2.0]},
    }
    over = against_floor(figures)
    assert over == {"distload": ([2.0, 1.5], [2.0, 1.0]), "get_slice": ([4.0, 3.0], [1.0, 2.0])}
    assert against_floor({"distload": figures["distload"]}) == {}


def test_scenario_kinds_name_their_process_count() -> None:
    from distload.bench.driver import world_of

    assert [world_of(k) for k in ("tp2", "tp4", "dp4", "2node")] == [2, 4, 4, 4]
    for bad in ("tp", "dp0", "pp4", "tpx"):
        with pytest.raises(SystemExit, match="unknown scenario"):
            world_of(bad)


def test_storage_probes_read_every_byte_buffered_and_direct(tmp_path: Path) -> None:
    """Both probes read the whole checkpoint (EOF ends the last block short) and say what it
    cost in CPU; O_DIRECT either reads it all or says it is refused (None), never half."""
    from distload.bench.limits import BLOCK, storage_probe

    (tmp_path / "a.safetensors").write_bytes(os.urandom(BLOCK + 12345))
    (tmp_path / "b.safetensors").write_bytes(os.urandom(4096 * 3))
    size = BLOCK + 12345 + 4096 * 3
    buffered = storage_probe(tmp_path, 2)
    assert buffered is not None and buffered.nbytes == size
    assert buffered.rate > 0 and buffered.cpu_per_gb >= 0
    direct = storage_probe(tmp_path, 2, direct=True)
    if direct is not None:
        assert direct.nbytes == size and direct.rate > 0 and direct.cpu_per_gb >= 0
    elif hasattr(os, "O_DIRECT"):
        with pytest.raises(OSError):  # refused for real: opening or reading fails
            fd = os.open(tmp_path / "a.safetensors", os.O_RDONLY | os.O_DIRECT)
            try:
                import mmap

                os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
            finally:
                os.close(fd)
