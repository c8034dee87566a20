"""The benchmark's report: per scenario and method the medians over interleaved rounds with
their spread, and distload's time against the fastest alternative pair by pair (round by
round), next to CPU seconds and the machine's limits measured in the same run."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
from collections import Counter

MiB = 2**20

Rows = dict[str, dict[str, list[list[dict]]]]  # scenario -> method -> rounds -> rank rows
# the method that moves the bytes alone (``distload.bench.methods.floor``): a limit of the
# machine measured in the same run, not an alternative
FLOOR = "floor"


def spread(values: list[float], digits: int = 2) -> str:
    """``median [min-max]`` of ``values``."""
    f = f"{{:.{digits}f}}"
    med = f.format(statistics.median(values))
    return f"{med} [{f.format(min(values))}-{f.format(max(values))}]"


def _round_figures(rounds: list[list[dict]], total: int) -> dict[str, list]:
    """Per round: the slowest rank's seconds, the job's CPU seconds and so on."""
    return {
        "seconds": [r[0]["slowest_seconds"] for r in rounds],
        "cpu": [r[0]["job_cpu_seconds"] for r in rounds],
        "extra": [max(x["extra_over_part"] for x in r) for r in rounds],
        "read": [r[0]["job_storage_read"] / total for r in rounds],
        "exact": [all(x["bit_exact"] for x in r) for r in rounds],
        "copies": [r[0].get("copies_per_byte") for r in rounds],
    }


def pairwise(
    figures: dict[str, dict[str, list]],
) -> tuple[list[float], list[float], Counter[str]]:
    """Round by round: distload's time and CPU seconds over those of the fastest alternative
    of that round, and which alternative that was (``floor`` is no alternative: see
    :func:`against_floor`)."""
    alternatives = [m for m in figures if m not in ("distload", FLOOR)]
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    fastest: Counter[str] = Counter()
    if "distload" not in figures or not alternatives:
        return ratios, cpu_ratios, fastest
    for k, mine in enumerate(figures["distload"]["seconds"]):
        best = min(alternatives, key=lambda m: figures[m]["seconds"][k])
        fastest[best] += 1
        ratios.append(mine / figures[best]["seconds"][k])
        cpu_ratios.append(figures["distload"]["cpu"][k] / figures[best]["cpu"][k])
    return ratios, cpu_ratios, fastest


def against_floor(
    figures: dict[str, dict[str, list]],
) -> dict[str, tuple[list[float], list[float]]]:
    """Round by round, each method's time and CPU seconds over the floor's of that round
    (empty without a floor)."""
    if FLOOR not in figures:
        return {}
    base = figures[FLOOR]
    return {
        m: (
            [a / b for a, b in zip(f["seconds"], base["seconds"], strict=True)],
            [a / b for a, b in zip(f["cpu"], base["cpu"], strict=True)],
        )
        for m, f in figures.items()
        if m != FLOOR
    }


def _direct(limits: dict) -> str:
    """The O_DIRECT probe's clause of the limits line (empty where it was refused)."""
    if limits.get("direct") is None:
        return ", O_DIRECT refused here"
    return (
        f", {limits['direct'] / 1e9:.2f} GB/s with 4 O_DIRECT readers "
        f"({limits['direct_cpu']:.2f} CPU s per GB)"
    )


def _header(args: argparse.Namespace, total: int, nfiles: int, limits: dict) -> list[str]:
    command = (
        f"distload bench --size-mb {args.size_mb:g} --shard-mb {args.shard_mb:g} --scenarios "
        f"{args.scenarios} --cache {args.cache} --rounds {args.rounds} --staging-mb "
        f"{args.staging_mb:g} --methods {args.methods}"
        + (f" --results {args.results}" if args.results else "")
    )
    return [
        "# distload load benchmark",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, {platform.system()} {platform.release()}; gloo on CPU",
        f"- checkpoint: synthetic Llama-shaped bf16, {total / MiB:.0f} MiB in {nfiles} shards; "
        "TP with the llama preset into preallocated destinations; cold = page cache evicted "
        "before every run, warm = every shard read into the page cache before every run",
        f"- machine limits, same run: storage {limits['one'] / 1e9:.2f} GB/s with one reader, "
        f"{limits['many'] / 1e9:.2f} GB/s with 4 (cold: {total / limits['many']:.2f} s for the "
        f"checkpoint at best; {limits['many_cpu']:.2f} CPU s per GB through the "
        f"page cache){_direct(limits)}; host copy {limits['copy'] / 1e9:.2f} GB/s; loopback TCP "
        f"{limits['net'] / 1e9:.2f} GB/s",
        f"- {args.rounds} rounds, methods interleaved within each round; figures are "
        "`median [min-max]` over rounds; time = slowest rank; CPU = user + system seconds of "
        "all ranks; ratio = distload / the fastest alternative of the same round, pair by "
        "pair; extra memory = peak held over the rank's part (worst rank); storage read = "
        "bytes the job fetched from storage / checkpoint bytes",
    ]


def render(
    rows: Rows,
    args: argparse.Namespace,
    *,
    total: int,
    nfiles: int,
    limits: dict,
    notes: list[str],
    model: dict[str, float] | None = None,
) -> str:
    lines = _header(args, total, nfiles, limits) + [f"- {n}" for n in notes] + [""]
    summary = [
        "| scenario | distload s | fastest alternative s | distload / fastest, pair by pair | "
        "CPU s distload / fastest | distload CPU copies per byte | storage read distload / "
        "alternatives |",
        "|---|---|---|---|---|---|---|",
    ]
    sections: list[str] = []
    for scenario, by_method in rows.items():
        figures = {m: _round_figures(r, total) for m, r in by_method.items() if r}
        ratios, cpu_ratios, fastest = pairwise(figures)
        sections += _section(scenario, figures, ratios, fastest, model)
        if ratios:
            top = fastest.most_common(1)[0][0]
            d, alt = figures["distload"], figures[top]
            reads = [statistics.median(figures[m]["read"]) for m in figures if m != "distload"]
            summary.append(
                f"| {scenario} | {spread(d['seconds'])} | {spread(alt['seconds'])} (`{top}`) | "
                f"**{spread(ratios)}** | {spread(cpu_ratios)} | "
                f"{spread([c for c in d['copies'] if c is not None])} | "
                f"{statistics.median(d['read']):.2f}x / {min(reads):.2f}-{max(reads):.2f}x |"
            )
    return "\n".join([*lines, "## Summary", "", *summary, "", *sections]) + "\n"


def _section(
    scenario: str,
    figures: dict[str, dict[str, list]],
    ratios: list[float],
    fastest: Counter[str],
    model: dict[str, float] | None,
) -> list[str]:
    lines = [
        f"## {scenario}",
        "",
        "| method | time s | CPU s | extra memory MiB | storage read x ckpt | bit exact |",
        "|---|---|---|---|---|---|",
    ]
    for method, f in figures.items():
        lines.append(
            f"| {method} | {spread(f['seconds'])} | {spread(f['cpu'])} | "
            f"{max(f['extra']) / MiB:.0f} | {statistics.median(f['read']):.2f} | "
            f"{all(f['exact'])} |"
        )
    if ratios:
        who = ", ".join(f"`{m}` {n}x" for m, n in fastest.most_common())
        lines += [
            "",
            f"distload / fastest alternative per round: "
            f"{', '.join(f'{r:.2f}' for r in ratios)} (fastest: {who}).",
        ]
    over = against_floor(figures)
    if over:
        lines += [
            "",
            "Over the floor (the bytes alone, one copy each), pair by pair: "
            + "; ".join(f"`{m}` time {spread(t)}, CPU {spread(c)}" for m, (t, c) in over.items())
            + ".",
        ]
    kind = scenario.split(maxsplit=1)[0]
    if model and kind in model and scenario.endswith("cold") and "distload" in figures:
        measured = statistics.median(figures["distload"]["seconds"])
        lines.append(
            f"`distload plan --simulate` predicts {model[kind]:.2f} s from the measured limits "
            f"(measured {measured:.2f} s)."
        )
    return [*lines, ""]
