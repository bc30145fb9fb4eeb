"""The `dqprof report` command (registered by dqprof/cli.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dqprof.output import Col, FormatOpt, Rows, WideOpt, check_format, col, emit

SHOWN = 8  # left-out notes printed on the terminal; summary.md lists them all


def report(
    runs: Annotated[list[Path] | None, typer.Argument(
        help="Run folders (run.json + kernels.jsonl). None: the committed H200 profile "
             "(profiles/h200/). Two or more: compared, aligned by (layer, M, backend, "
             "variant), against the first.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder: report.html, "
                                      "summary.md, plots as PNG and SVG.")] = Path("report"),
    fmt: FormatOpt = "table",
    wide: WideOpt = False,
) -> None:
    """Explain a profile: roofline, energy roofline, dequantization tax, per-layer energy per
    token, break-even M; report.html + summary.md (works without a GPU). Prints all linears
    per token against bf16 (--format csv|json|md: that table alone on stdout)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    from rich.console import Console
    from rich.markup import escape

    from dqprof.analysis.report import make_report

    check_format(fmt)
    result = make_report(list(runs or []), out)
    console = Console()
    note = console if fmt == "table" else Console(stderr=True)  # stdout: the data alone
    emit(per_token_rows(result.analyses), fmt, console, wide)
    note.print(f"{result.out}/report.html, summary.md and {len(result.files) - 2} more "
               f"files written")
    for item in result.left_out[:SHOWN]:
        # escaped: series labels like triton-nf4[decode=shfl] are not markup
        note.print(f"[yellow]left out:[/] {escape(item)}", highlight=False)
    if len(result.left_out) > SHOWN:
        note.print(f"... and {len(result.left_out) - SHOWN} more left out: see summary.md")


def _scenario_key(label: str) -> str:
    """'decode, batch 8' -> decode_b8; 'prefill, 2048 tokens' -> prefill_2048"""
    words = label.replace(",", "").split()
    return f"decode_b{words[-1]}" if words[0] == "decode" else f"prefill_{words[1]}"


def _bounded(key: str, label: str, show: Callable[[Any], str]) -> Callable[[dict], str]:
    """A cell that reads '≤ x' where the row's figure in scenario ``label`` is an upper bound."""
    return lambda r: ("≤ " if label in r.get("upper_bound", ()) else "") + show(r.get(key))


def per_token_rows(analyses: list) -> Rows:
    """All linears per token in each scenario, per path, and its ratio to bf16: energy where
    the run measured it, else time (the report's first table)."""
    from dqprof.analysis import fmt
    from dqprof.analysis.breakdown import SCENARIOS, totals, upper_bounds
    from dqprof.analysis.frame import reference_of

    records = []
    for a in analyses:
        metric = a.metrics[-1]
        tabs = {sc: totals(rows) for sc, rows in a.per_token[metric].items()}
        bounds = {sc: upper_bounds(rows) for sc, rows in a.per_token[metric].items()}
        refs = reference_of(a.points)
        for s in a.series:
            # scenarios whose total is an upper bound (a layer's window idled: see summary.md)
            r = {"run": a.run.label, "path": s, "metric": metric,
                 "upper_bound": [sc.label for sc in SCENARIOS if s in bounds.get(sc, {})]}
            for sc in SCENARIOS:
                t = tabs.get(sc)
                have = t is not None and not t.empty and s in t.index
                v = float(t.loc[s, "total"]) if have else None
                ref = (float(t.loc[refs[s], "total"]) if have and refs[s] in t.index
                       else None)
                key = _scenario_key(sc.label)
                r[f"{key}_per_token"] = v
                r[f"{key}_vs_bf16"] = v / ref if v is not None and ref else None
            if any(r[f"{_scenario_key(sc.label)}_per_token"] is not None for sc in SCENARIOS):
                records.append(r)
    metric = analyses[0].metrics[-1] if analyses else "energy_j"
    unit = fmt.mj if metric == "energy_j" else fmt.us

    def ratio(v: float | None) -> str:
        return fmt.ratio(v if v is not None else math.nan)

    def value(v: float | None) -> str:
        return unit(v if v is not None else math.nan)

    cols = ([col("run")] if len(analyses) > 1 else []) + [col("path")]
    for sc in SCENARIOS:
        key, short = _scenario_key(sc.label), sc.label.replace("decode, batch ", "B=")
        short = short.replace("prefill, ", "prefill ").replace(" tokens", "")
        cols.append(Col(f"{sc.label} ×bf16", _bounded(f"{key}_vs_bf16", sc.label, ratio),
                        num=True, short=f"{short} ×bf16"))
    for sc in SCENARIOS:
        key, short = _scenario_key(sc.label), sc.label.replace("decode, batch ", "B=")
        short = short.replace("prefill, ", "prefill ").replace(" tokens", "")
        cols.append(Col(f"{sc.label} per token", _bounded(f"{key}_per_token", sc.label, value),
                        num=True, short=f"{short} per token", optional=True))
    word = "energy" if metric == "energy_j" else "time"
    return Rows(list(records[0]) if records else [], records, cols,
                f"all linear layers per token, {word} against bf16")
