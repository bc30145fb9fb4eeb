"""The report's text: headline tables, findings, method and what was left out, as a ``Doc``
(summary.md renders it without figures, report.html with them)."""

from __future__ import annotations

import pandas as pd

from dqprof.analysis import tables
from dqprof.analysis.barplots import tax_series
from dqprof.analysis.breakdown import DECODE, PREFILL
from dqprof.analysis.breakeven import BREAK_EVEN_METHOD
from dqprof.analysis.compute import Analysis
from dqprof.analysis.doc import Doc, Heading, Items, Para, Plot
from dqprof.analysis.energy import SPLIT_METHOD
from dqprof.analysis.findings import findings
from dqprof.analysis.format_path_section import section as format_path_section

METHOD = [
    "Energy per call: NVML board energy over windows aligned to the counter's ticks, divided "
    "by the calls completed in the window; idle power included (what the GPU draws while the "
    "call runs). The energy-roofline fit uses energy above idle.",
    "Energy by kernel category: " + SPLIT_METHOD + ". Estimates are marked '~' in tables "
    "and hatched in plots.",
    "Break-even M: " + BREAK_EVEN_METHOD,
    "Per token: decode with batch B runs every layer at M=B per step of B tokens; prefill of "
    "T tokens runs every layer at M=T, per-sequence layers (lm_head) at M=1 once per prompt; "
    "per token = calls_per_token x per-call figure / tokens. A layer a path leaves bf16 "
    "(lm_head) or cannot run uses the bf16 record, and the notes say so.",
    "An M the run did not measure is interpolated in log-log between the nearest measured M "
    "below and above; outside the measured range the nearest measured M is used (no "
    "extrapolation). The notes under each table say which.",
    "Bytes: dqprof.bytemodel's minimum traffic per call (each input read once, each output "
    "written once; unfused paths add the bf16 weight written and read back).",
]


def _plot(plots: dict[str, Plot], name: str) -> list[Plot]:
    return [plots[name]] if name in plots else []


def run_blocks(a: Analysis, plots: dict[str, Plot], level: int = 2, prefix: str = "",
               full_model: list | None = None) -> list:
    h = level
    run = a.run
    counts = run.points["status"].value_counts()
    out: list = [Para(
        f"Run `{run.path}`: {run.model} on {run.gpu}; "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "skipped", "failed"))
        + " points; paths: " + ", ".join(a.series) + ".")]
    out += [Heading(h, "Findings"), Items(findings(a), ordered=True)]
    out.append(Heading(h, "All linears per token, relative to bf16"))
    for metric in reversed(a.metrics):  # energy first where measured
        word = "Energy" if metric == "energy_j" else "Time"
        out += [Heading(h + 1, word), tables.per_token(a, metric)]
        notes = tables.per_token_notes(a, metric)
        if notes:
            out.append(Items(notes))
        out += _plot(plots, prefix + ("per_token_energy" if metric == "energy_j"
                                      else "per_token_time"))
    detail = a.metrics[-1]
    out.append(Heading(h + 1, "Per layer"))
    for sc in (DECODE[0], PREFILL[-1]):
        out += [Para(f"{sc.label}, per token:"), tables.per_layer(a, detail, sc)]
    out += format_path_section(a, plots, prefix, h)
    out += [Heading(h, "Break-even M against bf16"), tables.break_even(a)]
    out += _plot(plots, prefix + "time_vs_m") + _plot(plots, prefix + "energy_vs_m")
    if not a.bytes.empty:
        out += [Heading(h, "Byte budget of the 4-bit weights"), tables.byte_budget(a)]
    if a.tax_layer and a.run.has_kernels:
        out += [Heading(h, "Dequantization tax by kernel category"),
                tables.tax(a, a.tax_layer, a.rep_ms, tax_series(a.series))]
        out += _plot(plots, prefix + "tax")
    out += [Heading(h, "Roofline"), tables.roofline(a, a.rep_ms)]
    if a.roof is not None:
        out.append(Para(f"Ceilings from run.json: copy bandwidth "
                        f"{a.roof.bytes_per_s / 1e12:.2f} TB/s, bf16 matmul "
                        f"{a.roof.flop_per_s / 1e12:.0f} TFLOP/s, ridge point "
                        f"{a.roof.ridge:.0f} FLOP/byte."))
    out += _plot(plots, prefix + "roofline")
    if a.fit is not None:
        out.append(Para(f"Energy fit ({a.fit.method}): {a.fit.j_per_byte * 1e12:.3g} pJ/byte, "
                        f"{a.fit.j_per_flop * 1e12:.3g} pJ/FLOP above idle; median error "
                        f"{100 * a.fit.median_rel_err:.0f}% over {a.fit.points} points."))
    out += _plot(plots, prefix + "energy_roofline")
    if full_model or prefix + "reconciliation" in plots:
        out += [Heading(h, "Full model in vLLM: energy per token, and what the kernels explain")]
        out += (full_model or []) + _plot(plots, prefix + "reconciliation")
    return out


def build(analyses: list[Analysis], plots: dict[str, Plot], prefixes: list[str],
          comparison: tuple[pd.DataFrame, pd.DataFrame, list[str]] | None = None,
          left_out: list[str] | None = None,
          full_model: dict[str, list] | None = None) -> Doc:
    """The whole document: one run, or a comparison followed by each run; ``full_model``:
    each run's (by prefix) full-model blocks."""
    full_model = full_model or {}
    doc = Doc()
    first = analyses[0].run
    if comparison is None:
        doc.add(Heading(1, f"dqprof report: {first.model} on {first.gpu}"))
        doc.add(*run_blocks(analyses[0], plots, 2, prefixes[0], full_model.get(prefixes[0])))
    else:
        summary, by_m, figures = comparison
        labels = ", ".join(a.run.label for a in analyses[1:])
        doc.add(Heading(1, f"dqprof comparison: {labels} against {first.label}"),
                Para("Points aligned by (layer, M, backend, variant); ratios are run / "
                     f"baseline ({first.label}). The full aligned table is comparison.csv."),
                tables.comparison(summary))
        for metric in ("energy_j", "time_s"):
            if all(metric in a.metrics for a in analyses):
                word = "energy" if metric == "energy_j" else "time"
                doc.add(Heading(2, f"All linears per token ({word}), side by side"),
                        tables.side_by_side(analyses, metric))
        doc.add(Heading(2, "Per call, run / baseline, against M"))
        for f in figures:
            doc.add(tables.comparison_by_m(by_m[f], f))
            doc.add(*_plot(plots, "compare_" + ("time" if f == "time_s" else "energy")))
        for a, prefix in zip(analyses, prefixes, strict=True):
            doc.add(Heading(2, f"Run {a.run.label}: {a.run.model} on {a.run.gpu}"))
            doc.add(*run_blocks(a, plots, 3, prefix, full_model.get(prefix)))
    doc.add(Heading(2, "Method"), Items(METHOD))
    left = list(dict.fromkeys((left_out or []) + [x for a in analyses for x in a.left_out]))
    doc.add(Heading(2, "Left out"), Items(left) if left else Para("Nothing: every point and "
                                                                   "figure was usable."))
    return doc
