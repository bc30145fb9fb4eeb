"""The ``regress`` and ``merge`` commands; dqprof/cli.py registers them, the work lives in
dqprof.gate.compare and dqprof.gate.merge.

Both catch DqprofError themselves so that the documented exit codes (0 pass, 1 regression,
2 unusable input) hold however the app is invoked, not only through ``cli.main``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from dqprof.errors import DqprofError
from dqprof.output import Col, FormatOpt, Rows, WideOpt, check_format, col, emit

if TYPE_CHECKING:
    from dqprof.gate.compare import Report

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")


def _fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except DqprofError as e:
        _fail(str(e), e.exit_code)


def _rows(report: Report, show_all: bool) -> Rows:
    """The points that changed, failed or are missing (all with ``show_all``)."""
    from dqprof.gate.compare import UNCHANGED
    from dqprof.gate.outputs import describe, fmt_change

    style = {"regression": "bold red", "failed": "red", "improvement": "green",
             "missing": "yellow", "new": "yellow", "unchanged": "dim"}
    records, cells = [], {}
    for p in report.points:
        if p.status == UNCHANGED and not (show_all or p.note):
            continue
        r: dict = {"point": p.key, "verdict": p.status}
        for metric, unit in (("time", "s"), ("energy", "j")):
            c = p.change(metric)
            r |= {f"{metric}_base_{unit}": c and c.base, f"{metric}_current_{unit}": c and c.cur,
                  f"{metric}_change": c and c.rel, f"{metric}_band": c and c.band}
            cells[(p.key, metric)] = (describe(c), fmt_change(c))
        records.append({**r, "note": p.note})
    fields = list(records[0]) if records else []
    cols = [col("point"), Col("verdict", lambda r: r["verdict"],
                              style=lambda r: style[r["verdict"]])]
    for metric in ("time", "energy"):
        cols += [Col(metric, lambda r, m=metric: cells[(r["point"], m)][0], optional=True),
                 Col(f"Δ {metric} (band)", lambda r, m=metric: cells[(r["point"], m)][1],
                     short=f"Δ {metric}")]
    cols.append(col("note", fmt=str))
    return Rows(fields, records, cols, "points that changed, failed or are missing"
                if not show_all else "")


def _annotate(report: Report) -> None:
    """GitHub workflow commands: regressions and warnings show on the run's summary page."""
    from dqprof.gate.compare import FAILED, REGRESSION
    from dqprof.gate.outputs import describe, fmt_change

    def esc(text: str) -> str:  # the workflow-command escaping of a message
        return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

    for w in report.warnings:
        print(f"::warning title=dqprof regress::{esc(w)}")
    for p in report.of(REGRESSION, FAILED):
        detail = "; ".join(f"{c.metric} {describe(c)} {fmt_change(c)}" for c in p.changes)
        print(f"::error title=kernel {p.status}::{esc(f'{p.key} {detail} {p.note}'.rstrip())}")


def regress(
    baseline: Annotated[Path, typer.Option(help="Baseline: a run folder, or a kernels .jsonl "
                                           "(its run.json read from <name>.run.json beside "
                                           "it).")],
    current: Annotated[Path, typer.Option(help="The run to check: a run folder or .jsonl.")],
    max_slowdown: Annotated[str, typer.Option(help="Time per call may grow this much "
                                              "('5%' or '0.05').")] = "5%",
    max_energy_increase: Annotated[str, typer.Option(help="Energy per call may grow this "
                                                     "much.")] = "7%",
    noise_k: Annotated[float, typer.Option(help="A change must also exceed this many times "
                                           "the root-sum-square of both sides' relative "
                                           "spreads.")] = 2.0,
    junit: Annotated[Path | None, typer.Option(help="Write JUnit XML here (one testcase "
                                               "per point).")] = None,
    summary: Annotated[Path | None, typer.Option(help="Write a markdown summary here (fits "
                                                 "$GITHUB_STEP_SUMMARY).")] = None,
    fail_on_missing: Annotated[bool, typer.Option(help="Points the baseline has but the "
                                                  "current run lacks fail the gate.")] = False,
    show_all: Annotated[bool, typer.Option(help="List unchanged points too.")] = False,
    update_baseline: Annotated[bool, typer.Option(help="Write the current run's ok records "
                                                  "to --baseline (and its run.json beside "
                                                  "it) instead of comparing.")] = False,
    per_board: Annotated[bool, typer.Option(help="With --update-baseline: --baseline is a "
                                            "folder of one <board UUID>.jsonl per board; "
                                            "regress picks the current board's file.")] = False,
    fmt: FormatOpt = "table",
    wide: WideOpt = False,
) -> None:
    """Gate a run against a baseline: exit 0 pass, 1 regression, 2 unusable input."""
    from dqprof.gate import compare as rg
    from dqprof.gate.outputs import to_junit, to_markdown
    from dqprof.results import write_atomic

    if per_board and not update_baseline:
        _fail("--per-board goes with --update-baseline (regress reads a per-board folder as "
              "it is)")
    if update_baseline and per_board:
        from dqprof.gate.boards import write_board_baselines

        for uuid, n in _guard(lambda: write_board_baselines(current, baseline)):
            console.print(f"{baseline}/{uuid}.jsonl: baseline written from {current} ({n} ok "
                          f"records)", highlight=False)
        return
    _guard(lambda: check_format(fmt))
    if update_baseline:
        n = _guard(lambda: rg.write_baseline(current, baseline))
        console.print(f"{baseline}: baseline written from {current} ({n} ok records; "
                      f"environment in {rg.run_json_for(baseline)})")
        return
    gate = _guard(lambda: rg.Gate(rg.parse_fraction(max_slowdown),
                                  rg.parse_fraction(max_energy_increase), noise_k,
                                  fail_on_missing))
    if not baseline.exists():
        _fail(f"baseline {baseline} does not exist: make one on this runner's GPU with "
              f"`dqprof regress --baseline {baseline} --current <run> --update-baseline` "
              f"(docs/ci.md)")
    report = _guard(lambda: rg.run_regress(baseline, current, gate))
    for w in report.warnings:
        err_console.print(f"[bold yellow]WARNING:[/] {escape(w)}", highlight=False, soft_wrap=True)
    rows = _rows(report, show_all)
    if rows.records or fmt != "table":  # CI logs (no terminal): rows at their whole width
        emit(rows, fmt, console, wide)
    if os.environ.get("GITHUB_ACTIONS") == "true" and fmt == "table":
        _annotate(report)
    if junit is not None:
        write_atomic(junit, to_junit(report))
    if summary is not None:
        write_atomic(summary, to_markdown(report))
    (console if fmt == "table" else err_console).print(  # csv/json/md: stdout holds data only
        report.headline(), style="bold red" if report.exit_code else "bold green",
        highlight=False)
    raise typer.Exit(report.exit_code)


def merge(
    runs: Annotated[list[Path], typer.Argument(help="Run folders to join (e.g. the shards "
                                               "of one sweep).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="The merged run folder.")],
    force: Annotated[bool, typer.Option(help="Merge runs from different GPUs or sweep "
                                        "configs anyway.")] = False,
) -> None:
    """Join run folders (shards of one sweep) into one; refuses mismatched runs (exit 2)."""
    from dqprof.gate.merge import merge_runs

    result = _guard(lambda: merge_runs(runs, out, force))
    for w in result.warnings:
        err_console.print(f"[bold yellow]WARNING:[/] {escape(w)}", highlight=False, soft_wrap=True)
    dup = f" ({result.duplicates} identical duplicates kept once)" if result.duplicates else ""
    console.print(f"{result.out}: {result.records} records from {len(runs)} runs{dup}")
