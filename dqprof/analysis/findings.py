"""Findings as sentences computed from the data: every number comes from the analysis.

Each candidate returns None when the run lacks what it needs (a CPU run has no energy, no
kernels and no ceilings); the report shows the first three that apply, in this order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd

from dqprof.analysis import fmt
from dqprof.analysis.breakdown import DECODE, PREFILL, totals, upper_bounds
from dqprof.analysis.breakeven import vs_reference
from dqprof.analysis.compute import Analysis
from dqprof.analysis.frame import NF4, REFERENCE

WORD = {"energy_j": "energy", "time_s": "time"}


def _metric(a: Analysis) -> str:
    return "energy_j" if "energy_j" in a.metrics else "time_s"


def _largest_layer(a: Analysis, layers: pd.Series) -> str | None:
    """The quantized layer with the largest weight (most bytes at stake)."""
    shapes = a.points[a.points["layer"].isin(set(layers))].drop_duplicates("layer")
    if shapes.empty:
        return None
    return str(shapes.loc[(shapes["n"] * shapes["k"]).idxmax(), "layer"])


def dequant_tax(a: Analysis) -> str | None:
    c = a.categories[a.categories["series"] == NF4]
    if c.empty or c["time_s"].isna().all():
        return None
    by = c.pivot_table(index=["layer", "m"], columns="category", values="time_s",
                       aggfunc="sum").fillna(0.0)
    if "dequant" not in by.columns or not (by["dequant"] > 0).any():
        return (f"{NF4} launched no dequantize kernel at any measured M: its fused kernels "
                f"took every call, so the dequantization tax is inside its GEMM time.")
    by = by[by["dequant"] > 0]
    layer = _largest_layer(a, by.index.get_level_values("layer").to_series())
    lay = by.loc[layer]
    share = lay["dequant"] / lay.sum(axis=1)
    m = int(share.idxmax())
    metric = _metric(a)
    text = (f"On {layer} (the largest quantized weight), {NF4} at M={m} spends "
            f"{fmt.pct(share[m])} of its kernel time in dequantize kernels")
    rows = c[(c["layer"] == layer) & (c["m"] == m)]
    if metric == "energy_j":
        dq = rows[rows["category"] == "dequant"]
        e_share = dq["energy_j"].sum() / rows["call_energy_j"].iloc[0]
        est = " (estimated from bnb-dequant's metered J/call)" if dq["estimated"].any() else ""
        text += f" and {fmt.pct(e_share)} of its energy per call{est}"
    vs = vs_reference(a.points, metric)
    r = vs[(vs["layer"] == layer) & (vs["m"] == m) & (vs["series"] == NF4)]
    if len(r):
        text += f"; the call costs {fmt.ratio(r['ratio'].iloc[0])} bf16's {WORD[metric]}"
    return text + "."


def _scenario_finding(a: Analysis, scenario) -> str | None:
    metric = _metric(a)
    t = totals(a.per_token[metric][scenario])
    bf16 = [s for s in t.index if s.startswith(REFERENCE)]
    if t.empty or not bf16 or len(t) < 2:
        return None
    tot = t["total"]
    ref = tot[REFERENCE] if REFERENCE in tot.index else tot[bf16[0]]
    rel = (tot / ref).drop(bf16)
    unit = fmt.mj if metric == "energy_j" else fmt.us
    what = "energy" if metric == "energy_j" else "device time"
    text = (f"For {scenario.label}, all linears of {a.run.model} cost {unit(ref)} of {what} "
            f"per token with bf16")
    bounds = upper_bounds(a.per_token[metric][scenario])
    le = {s: "at most " if s in bounds else "" for s in rel.index}  # a window idled: see notes
    if NF4 in rel.index:
        text += f"; {NF4} costs {le[NF4]}{fmt.ratio(rel[NF4])} that"
    best = rel.idxmin()
    if best != NF4:
        verdict = "the cheapest path" if rel[best] < 1 else "the closest to bf16"
        text += f", and {best} is {verdict} at {le[best]}{fmt.ratio(rel[best])}"
    return text + "."


def decode_batch1(a: Analysis) -> str | None:
    return _scenario_finding(a, DECODE[0])


def prefill(a: Analysis) -> str | None:
    return _scenario_finding(a, PREFILL[-1])


def break_even(a: Analysis) -> str | None:
    metric = _metric(a)
    be = a.break_even[metric]
    if be.empty:
        return None
    series = NF4 if (be["series"] == NF4).any() else be["series"].iloc[0]
    b = be[be["series"] == series]
    numeric = pd.to_numeric(b["break_even"], errors="coerce").dropna()
    always = int((b["break_even"] == "always").sum())
    never = int((b["break_even"] == "never").sum())
    parts = []
    if len(numeric):
        parts.append(f"from M={fmt.m_value(numeric.median())} on (median over the "
                     f"{fmt.plural(len(numeric), 'layer')} where it crosses)")
    if always:
        parts.append(f"at every measured M on {fmt.plural(always, 'layer')}")
    if never:
        parts.append(f"at no measured M on {fmt.plural(never, 'layer')} (it stays cheaper "
                     f"up to M={int(b['m_max'].max())})")
    return (f"{series} costs at least bf16's {WORD[metric]} per call " + "; ".join(parts)
            + f"; {fmt.plural(len(b), 'layer')} compared.")


def byte_budget(a: Analysis) -> str | None:
    if a.bytes.empty or a.roof is None:  # no quantized path, or no ceilings
        return None
    b = a.bytes[a.bytes["series"] == NF4].dropna(subset=["dequant_time_s", "saved_ideal_s"])
    if b.empty:
        return None
    r = b.loc[b["bf16_weight_bytes"].idxmax()]
    return (f"On {r['layer']}, NF4 storage saves {fmt.mb(r['saved_bytes'])} of weight reads per "
            f"call ({fmt.us(r['saved_ideal_s'])} at the measured "
            f"{a.roof.bytes_per_s / 1e12:.2f} TB/s), but the dequantize kernel alone takes "
            f"{fmt.us(r['dequant_time_s'])}: {fmt.ratio(r['dequant_time_s'] / r['saved_ideal_s'])} "
            f"the time the smaller weight can save, before the GEMM re-reads "
            f"{fmt.mb(r['bf16_weight_bytes'])} of bf16 weight.")


def energy_fit(a: Analysis) -> str | None:
    f = a.fit
    if f is None or f.j_per_byte <= 0 or f.j_per_flop <= 0:
        return None
    return (f"Fitted over {f.points} points (median error {fmt.pct(f.median_rel_err)}), a byte "
            f"moved costs {f.j_per_byte * 1e12:.3g} pJ and a FLOP {f.j_per_flop * 1e12:.3g} pJ "
            f"above idle on this GPU: one byte costs as much as {f.balance:.0f} FLOPs.")


def bandwidth_at_m1(a: Analysis) -> str | None:
    p = a.roofline
    if a.roof is None or p.empty or not (p["m"] == 1).any():
        return None
    med = p[p["m"] == 1].groupby("series", sort=False)["frac_bandwidth"].median()
    parts = [f"{s} {fmt.pct(v)}" for s, v in med.items() if math.isfinite(v)]
    return ("At M=1 the median fraction of the copy bandwidth reached across layers "
            "(byte-model traffic over time) is: " + ", ".join(parts) + ".")


def format_or_path(a: Analysis) -> str | None:
    """bnb-nf4's excess over the best fused int4 path at decode batch 1: path or format."""
    from dqprof.analysis.format_path_section import token_sentence

    f = a.format_path
    if f is None or not f.splittable:
        return None
    return token_sentence(f, _metric(a), DECODE[0])


CANDIDATES: tuple[Callable[[Analysis], str | None], ...] = (
    dequant_tax, format_or_path, decode_batch1, break_even, byte_budget, energy_fit, prefill,
    bandwidth_at_m1)


def findings(a: Analysis, count: int = 3) -> list[str]:
    out = []
    for f in CANDIDATES:
        text = f(a)
        if text:
            out.append(text)
        if len(out) == count:
            break
    return out
