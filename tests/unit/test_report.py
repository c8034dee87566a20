"""The load report: phase columns in the order phases run, figures from every rank."""

from __future__ import annotations

import time

from distload.report import LoadFacts, PhaseClock, RankReport, load_report


def test_phase_clock_laps_and_recorded_parts() -> None:
    clock = PhaseClock()
    time.sleep(0.01)
    clock.lap("runtime")
    clock.record("read", 0.5)
    clock.lap("execute")
    seconds = clock.finish()
    assert list(seconds) == ["runtime", "read", "execute", "total"]
    assert seconds["runtime"] >= 0.01 and seconds["read"] == 0.5
    assert seconds["total"] >= seconds["runtime"] + seconds["execute"]


def test_table_columns_follow_the_phases() -> None:
    seconds = {"execute": 0.5, "plan": 0.1, "runtime": 0.2}  # not in phase order
    ranks = [
        RankReport(
            rank=r,
            bytes_read=100 * r,
            seconds=dict(seconds, total=1.0 + r),
        )
        for r in range(2)
    ]
    facts = LoadFacts("ckpt", 2, 100, 3, 4, "replicate", [0, 0], "shared memory")
    report = load_report(facts, ranks)
    assert report.wall_seconds == 2.0 and report.bytes_read == 100 and report.nodes == 1
    header = report.table().splitlines()[3].split()
    assert header[6:] == ["ops", "cpu", "runtime", "plan", "execute", "total"]
    assert RankReport.from_json(ranks[1].to_json()) == ranks[1]


def test_head_line_says_how_much_was_read_with_o_direct() -> None:
    ranks = [
        RankReport(rank=0, bytes_read=300, bytes_direct=300, bytes_copied=300, bytes_held=400),
        RankReport(rank=1, bytes_read=100, bytes_kernel_copied=100, bytes_held=400),
    ]
    facts = LoadFacts("ckpt", 2, 400, 3, 4, "replicate", [0, 0], "shared memory")
    report = load_report(facts, ranks)
    assert report.bytes_direct == 300
    head = report.table().splitlines()[2]
    assert "read 400 B (1.00x the checkpoint, 75% with O_DIRECT)" in head
    # the bounce copies count with distload's own, the buffered read's with the kernel's
    assert report.cpu_copies_per_byte == (300 + 100) / 800
    nothing = load_report(facts, [RankReport(rank=0), RankReport(rank=1)])
    assert "(0.00x the checkpoint)" in nothing.table()  # nothing read: no read path to tell


def test_the_cli_turns_direct_reads_off() -> None:
    from distload.cli import build_parser

    assert build_parser().parse_args(["load", "ckpt"]).direct_io is True
    assert build_parser().parse_args(["load", "ckpt", "--no-direct-io"]).direct_io is False
