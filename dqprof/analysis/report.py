"""`dqprof report`: run folders in, a folder out with report.html (self-contained),
summary.md (headline tables) and every plot as PNG and SVG."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dqprof.analysis import doc as docs
from dqprof.analysis import summary
from dqprof.analysis.compare import FIGURES, align, ratio_by_m, ratio_summary
from dqprof.analysis.compute import Analysis, analyze
from dqprof.analysis.figures import compare_figures, run_figures
from dqprof.analysis.frame import default_profile, load_runs, series_order
from dqprof.analysis.fullmodel_section import full_model_section
from dqprof.errors import DqprofError

DPI = 110


@dataclass
class ReportResult:
    out: Path
    files: list[Path]
    left_out: list[str]
    analyses: list[Analysis] = field(default_factory=list)  # what the terminal summary shows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def _write_figure(fig, out: Path, name: str) -> tuple[bytes, list[Path]]:
    png, svg = out / f"{name}.png", out / f"{name}.svg"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    png.write_bytes(buf.getvalue())
    fig.set_layout_engine("none")  # keep the layout the PNG computed: halves the SVG's cost
    fig.savefig(svg, format="svg")
    return buf.getvalue(), [png, svg]


def make_report(paths: list[Path | str] | None, out: Path | str) -> ReportResult:
    """Read the runs (default: the committed H200 profile), write the report into ``out``."""
    if not paths:
        profile = default_profile()
        if not (profile / "kernels.jsonl").exists():
            raise DqprofError(f"no committed profile at {profile}: pass a run folder "
                              f"(`dqprof report runs/<run>`)")
        paths = [profile]
    runs = load_runs(list(paths))
    multi = len(runs) > 1
    aligned, left = align(runs) if multi else (None, [])  # fatal problems before any file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    analyses: list[Analysis] = [analyze(r) for r in runs]
    prefixes = [f"{_slug(r.label)}-" if multi else "" for r in runs]
    figs = {}
    full_model: dict[str, list] = {}  # prefix -> the full-model section's blocks
    comparison = None
    if aligned is not None:
        figures = [f for f in FIGURES if aligned[f"{f}_ratio"].notna().any()]
        if "energy_j" not in figures:
            left.append("comparison of energy: no common point has energy in both runs")
        series = series_order(aligned)
        figs.update(compare_figures(aligned, runs[0].label, series, figures))
        comparison = (ratio_summary(aligned), {f: ratio_by_m(aligned, f) for f in figures},
                      figures)
        csv = out / "comparison.csv"
        aligned.to_csv(csv, index=False)
    for a, prefix in zip(analyses, prefixes, strict=True):
        figs.update(run_figures(a, prefix))
        recon, full_model[prefix], missed = full_model_section(a.run, prefix)
        figs.update(recon)
        left += missed
    files: list[Path] = [out / "comparison.csv"] if multi else []
    for a, prefix in zip(analyses, prefixes, strict=True):
        files += _format_path_csv(a, out / f"{prefix}format_path.csv")
    plots = {}
    for name, (fig, caption) in figs.items():
        png, written = _write_figure(fig, out, name)
        plots[name] = docs.Plot(name, caption, png)
        files += written
    document = summary.build(analyses, plots, prefixes, comparison, left, full_model)
    md, html = out / "summary.md", out / "report.html"
    md.write_text(docs.to_markdown(document))
    title = document.blocks[0].text if document.blocks else "dqprof report"
    html.write_text(docs.to_html(document, title))
    return ReportResult(out, [html, md] + files, _left_out(document), analyses)


def _format_path_csv(a: Analysis, path: Path) -> list[Path]:
    """Every (layer, M) split of bnb-nf4's excess, one row per metric (the section's data)."""
    f = a.format_path
    if f is None or not f.splittable:
        return []
    frames = [p.assign(metric=m) for m, p in f.points.items()]
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return [path]


def _left_out(document: docs.Doc) -> list[str]:
    """The items under the 'Left out' heading."""
    blocks = document.blocks
    for i, b in enumerate(blocks):
        if isinstance(b, docs.Heading) and b.text == "Left out" and i + 1 < len(blocks):
            nxt = blocks[i + 1]
            return list(nxt.items) if isinstance(nxt, docs.Items) else []
    return []
