"""Render the tables of docs/failure-matrix.md from a run's log.

DISTLOAD_MATRIX_LOG=/tmp/m.jsonl python -m pytest tests/distributed/test_failure_matrix.py \
    tests/distributed/test_agreement.py tests/distributed/test_rendezvous.py \
    tests/distributed/test_hostile_ranks.py tests/distributed/test_faults.py
python -m tests.distributed.matrix_table /tmp/m.jsonl
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from distload.errors import PHASES

COLUMNS = {
    "exception": "exception on rank 1",
    "exception@0": "exception on the coordinator (rank 0)",
    "kill": "rank 1 killed (SIGKILL)",
    "stall_long": "rank 1 stalled 10 s (> 4 s timeout)",
    "stall_short": "rank 1 stalled 1.2 s (< timeout)",
}


def cell(record: dict) -> str:
    """What the surviving ranks raised, in which phase, naming whom, and by when."""
    victim = 0 if record["kind"] == "exception@0" else 1
    results = {int(r): v for r, v in record["results"].items() if v is not None}
    if record["kind"] == "stall_short":
        if all(v["ok"] for v in results.values()):
            slowest = max(v.get("seconds", 0.0) for v in results.values())
            return f"loaded on all ranks ({slowest:.1f} s)"
        return "FAILED: " + "; ".join(v.get("message", "")[:80] for v in results.values())
    survivors = [v for r, v in results.items() if r != victim]
    if not survivors:
        return "no survivor reported"
    types = sorted({v["type"] for v in survivors})
    phases = sorted({v["phase"] for v in survivors})
    named = sorted({str(v["ranks"]) for v in survivors})
    slowest = max(v["seconds"] for v in survivors)
    return (
        f"{' / '.join(types)} in {' / '.join(f'`{p}`' for p in phases)} naming "
        f"{' or '.join(named)}, <= {slowest:.1f} s"
    )


def record_case(case: str, results: list[dict[str, Any]], victim: int | None) -> None:
    """Log one fault case beyond the matrix (when ``DISTLOAD_MATRIX_LOG`` is set): what every
    rank other than ``victim`` raised."""
    log = os.environ.get("DISTLOAD_MATRIX_LOG")
    if not log:
        return
    survivors = [r for i, r in enumerate(results) if i != victim and "type" in r]
    with open(log, "a") as fh:
        fh.write(json.dumps({"case": case, "survivors": survivors}) + "\n")


def render_cases(records: list[dict[str, Any]]) -> str:
    """The second table: one row per fault case beyond the matrix."""
    lines = ["| fault (world 3) | what the other ranks raised |", "|---|---|"]
    for rec in records:
        got = rec["survivors"]
        types = sorted({v["type"] for v in got})
        phases = sorted({f"`{v['phase']}`" for v in got})
        named = sorted({str(v["ranks"]) for v in got})
        slowest = max(v["seconds"] for v in got)
        lines.append(
            f"| {rec['case']} | {' / '.join(types)} in {' / '.join(phases)} naming "
            f"{' or '.join(named)}, <= {slowest:.1f} s |"
        )
    return "\n".join(lines) + "\n"


def _phase_order(phase: str) -> tuple[int, bool, str]:
    """Rows in the order a load runs its phases; a transfer's variants (``shm-transfer``,
    ``pagecache-transfer``, ...) after the plain one."""
    base = phase.rsplit("-", 1)[-1]
    return (PHASES.index(base) if base in PHASES else len(PHASES), base != phase, phase)


def render(path: Path) -> str:
    everything = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in everything if "case" not in r]
    cases = [r for r in everything if "case" in r]
    phases: list[str] = []
    by_case: dict[tuple[str, str], dict] = {}
    for rec in records:
        if rec["phase"] not in phases:
            phases.append(rec["phase"])
        by_case[(rec["phase"], rec["kind"])] = rec
    lines = [
        "| phase | " + " | ".join(COLUMNS.values()) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    phases.sort(key=_phase_order)
    for phase in phases:
        cells = [cell(by_case[(phase, k)]) if (phase, k) in by_case else "-" for k in COLUMNS]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + ("\n" + render_cases(cases) if cases else "")


if __name__ == "__main__":
    sys.stdout.write(render(Path(sys.argv[1])))
