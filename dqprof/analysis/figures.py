"""Which figures a report holds, their file names and captions (built, not yet written)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from dqprof.analysis import barplots, plots
from dqprof.analysis.compare import ratio_by_m
from dqprof.analysis.compute import Analysis
from dqprof.analysis.energy import SPLIT_METHOD
from dqprof.analysis.frame import reference_of
from dqprof.analysis.interp import nearest_m


def run_figures(a: Analysis, prefix: str = "") -> dict[str, tuple[Figure, str]]:
    """name -> (figure, caption) for one run; figures the data cannot support are absent
    (``Analysis.left_out`` says why)."""
    title = f"{a.run.model} on {a.run.gpu}"
    figs: dict[str, tuple[Figure, str]] = {}
    figs[prefix + "roofline"] = (
        plots.roofline(a.roofline, a.roof, a.series, f"roofline, {title}"),
        "Achieved TFLOP/s against arithmetic intensity (byte model's minimum traffic), one "
        "colour per path, marker size per M; roofs: measured copy bandwidth and bf16 matmul.")
    if a.fit is not None:
        figs[prefix + "energy_roofline"] = (
            plots.energy_roofline(a.points, a.fit, a.series, f"energy roofline, {title}"),
            f"Energy above idle per FLOP against intensity; grey: {a.fit.method}.")
    for metric in a.metrics:
        word = "time" if metric == "time_s" else "energy"
        figs[prefix + f"{word}_vs_m"] = (
            plots.per_shape(a.points, metric, a.series, f"{word} per call against M, {title}"),
            f"{word.capitalize()} per call against M per layer; bf16 dashed black (reference); "
            f"bnb-dequant dotted (dequantize alone, independent of M).")
    if a.tax_layer and a.run.has_kernels:
        metric = "energy_j" if "energy_j" in a.metrics else "time_s"
        series = barplots.tax_series(a.series)
        figs[prefix + "tax"] = (
            barplots.tax(a.categories, a.tax_layer, a.rep_ms, series, metric),
            f"The dequantization tax on {a.tax_layer}: per-call "
            f"{'energy' if metric == 'energy_j' else 'kernel time'} by kernel category at "
            f"representative M. {SPLIT_METHOD if metric == 'energy_j' else ''}")
    for metric in a.metrics:
        tables = a.per_token[metric]
        if all(t.empty for t in tables.values()):
            continue
        word = "energy" if metric == "energy_j" else "time"
        figs[prefix + f"per_token_{word}"] = (
            barplots.per_token(tables, metric, a.series, reference_of(a.points)),
            f"All linears, {word} per token, stacked by layer group (calls_per_token x "
            f"per-call figure at the scenario's M / tokens). Dotted: layers the path leaves "
            f"bf16, drawn with the bf16 record. Unmeasured M: see the notes under the table.")
    fp_fig = format_path_figure(a)
    if fp_fig is not None:
        figs[prefix + "format_path"] = fp_fig
    return figs


def format_path_figure(a: Analysis) -> tuple[Figure, str] | None:
    """bnb-nf4's excess per layer split into path and format, at decode M=1 and prefill M=2048
    (the nearest measured M); None where the run cannot split (Analysis.format_path says why)."""
    f = a.format_path
    if f is None or not f.splittable:
        return None
    splits = {m: f.points[m] for m in reversed(a.metrics) if f.points[m]["path"].notna().any()
              and f.points[m]["gap"].notna().any()}
    ms = [u for _, u in nearest_m(f.points["time_s"]["m"], (1, 2048))]
    if not splits or not ms:
        return None
    return (barplots.format_path(splits, ms, f.roles.nf4, f.roles.fused),
            f"Per layer, per call at M={' and '.join(map(str, ms))}: {f.roles.nf4}'s excess "
            f"over the best fused int4 path (diamond, named) split into the path "
            f"({f.roles.nf4} − {f.roles.fused}) and the format ({f.roles.fused} − best); a part "
            f"left of 0 is negative (see the section's method).")


def compare_figures(aligned: pd.DataFrame, base: str, series: list[str],
                    figures: list[str]) -> dict[str, tuple[Figure, str]]:
    figs = {}
    for f in figures:
        word = "time" if f == "time_s" else "energy"
        figs[f"compare_{word}"] = (
            barplots.compare(ratio_by_m(aligned, f), aligned, f, base, series),
            f"{word.capitalize()} per call, run / {base} on common points: lines geometric "
            f"mean over layers, faint points single layers; below 1: cheaper than {base}.")
    return figs
