"""Everything the report says about one run, computed once (pure: no files written)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from dqprof.analysis import breakdown, breakeven, energy, format_path, roofline
from dqprof.analysis.frame import NF4, REFERENCE, Run
from dqprof.analysis.interp import nearest_m

REPRESENTATIVE_M = (1, 16, 256, 2048)


@dataclass
class Analysis:
    run: Run
    series: list[str]
    roof: roofline.Ceilings | None
    roofline: pd.DataFrame
    categories: pd.DataFrame
    fit: energy.EnergyFit | None
    break_even: dict[str, pd.DataFrame]  # metric -> table
    bytes: pd.DataFrame
    per_token: dict[str, dict[breakdown.Scenario, pd.DataFrame]]  # metric -> scenario -> rows
    metrics: list[str]  # figures this run has: time_s, and energy_j where measured
    tax_layer: str | None  # the layer the tax plot shows: the largest quantized weight
    rep_ms: list[tuple[int, int]]  # (representative M, measured M used for it)
    left_out: list[str] = field(default_factory=list)  # what the report could not show, why
    format_path: format_path.FormatPath | None = None  # bnb-nf4's excess: format or path

    @property
    def points(self) -> pd.DataFrame:
        return self.run.points


def analyze(run: Run) -> Analysis:
    pts = run.points
    left: list[str] = list(run.notes)
    ok_series = set(run.ok["series"])
    for s in run.series:
        if s not in ok_series:
            reasons = pts[pts["series"] == s]["reason"].dropna().unique()
            left.append(f"{s}: no ok point ({'; '.join(reasons[:3]) or 'no reason recorded'})")
    if REFERENCE not in ok_series:
        left.append("bf16 has no ok point: nothing is relative to bf16")
    metrics = ["time_s"] + (["energy_j"] if run.has_energy else [])
    if not run.has_energy:
        left.append(f"energy: no record of {run.label} has an energy figure (CPU run, or "
                    f"--no-energy / no NVML counter): energy plots and tables left out")
    if not run.has_kernels:
        left.append(f"kernel attribution: no record of {run.label} lists its kernels (CPU run "
                    f"or --no-attribution): the per-category tax plot is left out")
    roof = roofline.ceilings(run.ceilings)
    if roof is None:
        left.append("ceilings: run.json has no measured copy bandwidth / bf16 matmul rate "
                    "(CPU run): roofline drawn without roofs, ideal times left out")
    fit = energy.fit_energy(pts) if run.has_energy else None
    if run.has_energy and fit is None:
        left.append("energy roofline fit: fewer than 3 points with energy above idle and FLOPs")
    per_tok: dict[str, dict[breakdown.Scenario, pd.DataFrame]] = {}
    for metric in metrics:
        per_tok[metric] = {}
        for sc in breakdown.SCENARIOS:
            rows, lo = breakdown.per_token(pts, sc, metric)
            per_tok[metric][sc] = rows
            left += lo
    quant = breakeven.quantized(pts)
    nf4 = quant[quant["backend"] == NF4]
    pick = nf4 if len(nf4) else quant
    tax_layer = str(pick.loc[(pick["n"] * pick["k"]).idxmax(), "layer"]) if len(pick) else None
    rep_ms = nearest_m(pick["m"] if len(pick) else run.ok["m"], REPRESENTATIVE_M)
    return Analysis(
        run=run, tax_layer=tax_layer, rep_ms=rep_ms, series=run.series, roof=roof,
        roofline=roofline.roofline_points(pts, roof),
        categories=energy.category_frame(pts), fit=fit,
        break_even={m: breakeven.break_even(pts, m) for m in metrics},
        bytes=breakeven.byte_budget(pts, roof.bytes_per_s if roof else None),
        per_token=per_tok, metrics=metrics, left_out=list(dict.fromkeys(left)),
        format_path=format_path.analyze(pts, run.records, per_tok))
