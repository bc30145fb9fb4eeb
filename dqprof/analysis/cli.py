"""The `dqprof report` command (registered by dqprof/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SHOWN = 8  # left-out notes printed on the terminal; summary.md lists them all


def report(
    runs: Annotated[list[Path] | None, typer.Argument(
        help="Run folders (run.json + kernels.jsonl). None: the committed H200 profile "
             "(profiles/h200/). Two or more: compared, aligned by (layer, M, backend, "
             "variant), against the first.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder: report.html, "
                                      "summary.md, plots as PNG and SVG.")] = Path("report"),
) -> None:
    """Explain a profile: roofline, energy roofline, dequantization tax, per-layer energy per
    token, break-even M; report.html + summary.md (works without a GPU)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    from rich.console import Console

    from dqprof.analysis.report import make_report

    result = make_report(list(runs or []), out)
    console = Console()
    console.print(f"{result.out}/report.html, summary.md and {len(result.files) - 2} more "
                  f"files written")
    for item in result.left_out[:SHOWN]:
        console.print(f"[yellow]left out:[/] {item}", highlight=False)
    if len(result.left_out) > SHOWN:
        console.print(f"... and {len(result.left_out) - SHOWN} more left out: see summary.md")
