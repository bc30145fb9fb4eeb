"""The report's tables, as ``doc.Table`` blocks built from an ``Analysis``."""

from __future__ import annotations

import math

import pandas as pd

from dqprof.analysis import fmt
from dqprof.analysis.breakdown import DECODE, PREFILL, SCENARIOS, totals, upper_bounds
from dqprof.analysis.compute import Analysis
from dqprof.analysis.doc import Table
from dqprof.analysis.energy import ALL_CATEGORIES
from dqprof.analysis.frame import reference_of

UNIT = {"energy_j": fmt.mj, "time_s": fmt.us}
HEADLINE = (DECODE[0], DECODE[-1], PREFILL[-1])  # decode batch 1 and 64, prefill 2048 tokens


def per_token(a: Analysis, metric: str) -> Table:
    """Series x scenario: all linears per token, with the ratio to bf16."""
    tabs = {sc: totals(rows) for sc, rows in a.per_token[metric].items()}
    bounds = {sc: upper_bounds(rows) for sc, rows in a.per_token[metric].items()}
    series = [s for s in a.series if any(s in t.index for t in tabs.values() if not t.empty)]
    refs = reference_of(a.points)
    rows = []
    for s in series:
        cells = [s]
        for sc in SCENARIOS:
            t = tabs.get(sc)
            if t is None or t.empty or s not in t.index:
                cells.append(fmt.DASH)
                continue
            v = t.loc[s, "total"]
            ref = t.loc[refs[s], "total"] if refs[s] in t.index else math.nan
            le = "≤ " if s in bounds.get(sc, {}) else ""  # a layer's window idled: see notes
            cells.append(f"{le}{UNIT[metric](v)} ({le}{fmt.ratio(v / ref)})")
        rows.append(cells)
    return Table(["path"] + [sc.label for sc in SCENARIOS], rows)


def per_token_notes(a: Analysis, metric: str) -> list[str]:
    """Which M were interpolated or taken from the nearest M, and which layers used bf16."""
    notes = []
    subst: dict[str, set[str]] = {}
    for sc, rows in a.per_token[metric].items():
        if rows.empty:
            continue
        hows = rows[rows["interpolated"]].drop_duplicates("how")["how"].tolist()
        if hows:
            notes.append(f"{sc.label}: " + "; ".join(hows))
        for r in rows[rows["substituted"]].itertuples():
            subst.setdefault(f"{r.layer}: {r.note}", set()).add(r.series)
        for s, why in upper_bounds(rows).items():
            notes.append(f"{sc.label}: ≤ for {s}: an upper bound, the window of " + "; ".join(why)
                         + ", so its idle time was charged to the calls")
    for what, series in subst.items():
        notes.append(f"{what}, for {', '.join(sorted(series))}")
    return notes


def per_layer(a: Analysis, metric: str, scenario) -> Table:
    """Layer x series per-token figure in one scenario (the detail behind a stacked bar)."""
    rows = a.per_token[metric][scenario]
    if rows.empty:
        return Table(["layer"], [])
    series = [s for s in a.series if (rows["series"] == s).any()]
    out = []
    for layer, g in rows.groupby("layer", sort=False):
        cells = [layer, str(int(g["m"].iloc[0]))]
        for s in series:
            r = g[g["series"] == s]
            mark = " (bf16)" if len(r) and r["substituted"].iloc[0] else ""
            mark += " (≤)" if len(r) and r["upper_bound"].iloc[0] else ""
            cells.append(UNIT[metric](r["per_token"].iloc[0]) + mark if len(r) else fmt.DASH)
        out.append(cells)
    return Table(["layer", "M"] + series, out, "(bf16): the path leaves this layer bf16; the "
                 "bf16 record is used. (≤): an upper bound, from an energy window in which the "
                 "GPU idled.")


def _break_even_cell(t: pd.DataFrame, layer: str, series: str) -> str:
    r = t[(t["layer"] == layer) & (t["series"] == series)]
    if r.empty:
        return fmt.DASH
    r = r.iloc[0]
    cell = str(r["break_even"])
    if math.isfinite(r["crossing_m"]):
        cell += f" (≈{fmt.m_value(r['crossing_m']).lstrip('≈')})"
    return cell + (f" [{r['note']}]" if r["note"] else "")


def break_even(a: Analysis) -> Table:
    """Layer rows, one column per quantized path; cells 'time / energy' break-even M."""
    tabs = a.break_even
    present = {s for t in tabs.values() for s in t["series"]}
    series = [s for s in a.series if s in present]  # registry order, as elsewhere
    measured = {lay for t in tabs.values() for lay in t["layer"]}
    layers = [lay for lay in dict.fromkeys(a.points["layer"]) if lay in measured]
    rows = [[layer] + [" / ".join(_break_even_cell(t, layer, s) for t in tabs.values())
                       for s in series] for layer in layers]
    what = " / ".join("time" if m == "time_s" else "energy" for m in tabs)
    return Table(["layer"] + series, rows,
                 f"Cells: {what}. The first measured M from which on the path costs >= bf16 "
                 "per call (≈: the crossing interpolated in log-log); 'always' / 'never' as "
                 "defined under Method.")


def byte_budget(a: Analysis) -> Table:
    b = a.bytes
    rows = []
    for r in b.itertuples():
        unfused = r.unfused_from_m
        rows.append([r.layer, r.series, fmt.mb(r.bf16_weight_bytes), fmt.mb(r.stored_bytes),
                     fmt.mb(r.saved_bytes), fmt.us(r.saved_ideal_s), fmt.mb(r.dequant_bytes),
                     fmt.us(r.dequant_time_s), fmt.us(r.dequant_ideal_s),
                     fmt.mb(r.unfused_extra_bytes),
                     fmt.m_value(unfused) if unfused is not None else fmt.DASH])
    return Table(["layer", "path", "bf16 weight", "4-bit stored", "saved", "saved at copy bw",
                  "dequant kernel bytes", "dequant time (measured)", "dequant at copy bw",
                  "unfused extra bytes", "unfused from M"], rows,
                 "Per call. saved = bf16 weight - 4-bit weight and scales (what a fused path "
                 "avoids reading); dequant kernel = bnb-dequant's traffic (reads 4-bit, writes "
                 "bf16) and its measured time; unfused extra = dequant kernel bytes + the GEMM "
                 "re-reading the bf16 weight; unfused from M: smallest M whose attribution "
                 "shows dequantize kernels.")


def tax(a: Analysis, layer: str, ms: list[tuple[int, int]], series: list[str]) -> Table:
    """Per (M, path) on one layer: call figures and each category's share."""
    c = a.categories[a.categories["layer"] == layer]
    refs = reference_of(a.points)
    cats = [k for k in ALL_CATEGORIES if (c["category"] == k).any()]
    has_e = "energy_j" in a.metrics
    rows = []
    for _, used in ms:
        at = c[c["m"] == used]
        for s in series:
            r = at[at["series"] == s]
            if r.empty:
                continue
            ref = at[at["series"] == refs[s]]
            ref_e = ref["call_energy_j"].iloc[0] if len(ref) else math.nan
            tot_t = r["time_s"].sum()
            cells = [str(used), s, fmt.us(r["call_time_s"].iloc[0])]
            cells += [fmt.pct(r[r["category"] == k]["time_s"].sum() / tot_t) for k in cats]
            if has_e:
                e = r["call_energy_j"].iloc[0]
                dq = r[r["category"] == "dequant"]
                est = "~" if dq["estimated"].any() else ""
                dq_j = dq["energy_j"].sum()
                cells += [fmt.mj(e), est + fmt.mj(dq_j) if dq_j > 0 else fmt.DASH,
                          fmt.ratio(e / ref_e)]
            rows.append(cells)
    headers = ["M", "path", "time per call"] + [f"{k} share of kernel time" for k in cats]
    if has_e:
        headers += ["energy per call", "dequant energy", "energy × bf16"]
    return Table(headers, rows, f"{layer}. '~': estimate (bnb-dequant's metered J/call for "
                 "this layer); other shares split the call's energy by kernel time.")


def roofline(a: Analysis, ms: list[tuple[int, int]]) -> Table:
    p = a.roofline
    col = "frac_roof" if "frac_roof" in p.columns else None
    rows = []
    for s in a.series:
        q = p[p["series"] == s]
        if q.empty:
            continue
        cells = [s]
        for _, used in ms:
            v = q[q["m"] == used]
            cells.append(fmt.pct(v[col].median()) if col and len(v) else
                         f"{fmt.sig(v['flop_per_s'].median() / 1e12)} TFLOP/s" if len(v)
                         else fmt.DASH)
        rows.append(cells)
    what = "median fraction of the attainable roofline over layers" if col else \
        "median achieved TFLOP/s over layers (no ceilings)"
    return Table(["path"] + [f"M={u}" for _, u in ms], rows, what)


def side_by_side(analyses: list[Analysis], metric: str, scenarios: tuple = HEADLINE) -> Table:
    """All linears per token in each run, side by side, with the ratio to the first run."""
    tabs = [{sc: totals(a.per_token[metric][sc]) for sc in scenarios} for a in analyses]
    series = list(dict.fromkeys(s for t in tabs for sc in scenarios for s in t[sc].index))
    headers = ["path"] + [f"{sc.label}: {a.run.label}" for sc in scenarios for a in analyses]
    rows = []
    for s in series:
        cells = [s]
        for sc in scenarios:
            base = tabs[0][sc]["total"].get(s, math.nan) if not tabs[0][sc].empty else math.nan
            for i, t in enumerate(tabs):
                v = t[sc]["total"].get(s, math.nan) if not t[sc].empty else math.nan
                cells.append(UNIT[metric](v) + ("" if i == 0 else f" ({fmt.ratio(v / base)})"))
        rows.append(cells)
    return Table(headers, rows, "All linears per token; in brackets: ratio to the first run.")


def comparison(summary: pd.DataFrame) -> Table:
    return Table(["run", "path", "common points", "time ratio", "energy ratio"],
                 [[r.run, r.series, str(r.points), fmt.ratio(r.time_ratio),
                   fmt.ratio(r.energy_ratio)] for r in summary.itertuples()],
                 "Geometric mean over common (layer, M) points of run / baseline.")


def comparison_by_m(by_m: pd.DataFrame, figure: str) -> Table:
    ms = sorted(by_m["m"].unique())
    rows = []
    for (run, s), g in by_m.groupby(["run", "series"], sort=False):
        vals = dict(zip(g["m"], g["ratio"], strict=True))
        rows.append([run, s] + [fmt.ratio(vals.get(m, math.nan)) for m in ms])
    word = "time" if figure == "time_s" else "energy"
    return Table(["run", "path"] + [f"M={m}" for m in ms], rows,
                 f"{word} per call, run / baseline, geometric mean over layers")
