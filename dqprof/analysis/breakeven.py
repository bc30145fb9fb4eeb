"""Quantized paths against bf16: ratios per point, break-even M, and the byte budget."""

from __future__ import annotations

import math

import pandas as pd

from dqprof.analysis.frame import DEQUANT, DEQUANT_METERED, REFERENCE, reference_variant
from dqprof.bytemodel import bf16_gemm, nf4_dequantize

METRICS = {"time_s": "time", "energy_j": "energy"}
BREAK_EVEN_METHOD = (
    "per layer, path and figure (time or energy per call), over the M both the path and bf16 "
    "measured: the smallest measured M from which on the path costs >= bf16 at every larger "
    "measured M. 'always': >= bf16 at every measured M; 'never': still cheaper than bf16 at "
    "the largest measured M. In brackets: the crossing M interpolated in log-log between the "
    "last M below and the first M at or above bf16. A ratio that crosses more than once is "
    "named in a note.")


def quantized(points: pd.DataFrame) -> pd.DataFrame:
    """Ok points of GEMM paths other than the reference and the dequantize-only backend."""
    return points[(points["status"] == "ok") & ~points["backend"].isin([REFERENCE, DEQUANT])]


def vs_reference(points: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each quantized ok point with bf16's figure at the same (layer, M) and their ratio."""
    ref = points[(points["backend"] == REFERENCE) & (points["status"] == "ok")]
    ref = ref.assign(rv=ref["variant"].map(reference_variant))
    ref = ref[["layer", "m", "rv", metric]].rename(columns={metric: "ref"})
    q = quantized(points)
    cols = ["layer", "group", "m", "series", "backend", "variant", "value", "ref", "ratio"]
    if q.empty or ref.empty:
        return pd.DataFrame(columns=cols)
    q = q.assign(rv=q["variant"].map(reference_variant))
    out = q[["layer", "group", "m", "series", "backend", "variant", "rv", metric]].merge(
        ref, on=["layer", "m", "rv"], how="inner").rename(columns={metric: "value"})
    out["ratio"] = out["value"] / out["ref"]
    out = out[out["ratio"].map(math.isfinite)]
    return out[cols].sort_values(["layer", "series", "m"]).reset_index(drop=True)


def _crossing(m0: int, r0: float, m1: int, r1: float) -> float:
    if r1 == r0:
        return float(m1)
    t = -math.log(r0) / (math.log(r1) - math.log(r0))
    return math.exp(math.log(m0) + t * (math.log(m1) - math.log(m0)))


def break_even_one(ms: list[int], ratios: list[float]) -> tuple[str, float, str]:
    """(break-even: 'always' | 'never' | 'M', crossing M or NaN, note) for one curve."""
    ge = [r >= 1 for r in ratios]
    j = len(ge)
    while j > 0 and ge[j - 1]:
        j -= 1
    earlier = [m for m, g in zip(ms[:max(j - 1, 0)], ge, strict=False) if g]
    note = f"also >= bf16 at M={','.join(map(str, earlier))}" if earlier else ""
    if j == 0:
        return "always", math.nan, note
    if j == len(ge):
        above = [m for m, g in zip(ms, ge, strict=True) if g]
        note = f">= bf16 only at M={','.join(map(str, above))}" if above else ""
        return "never", math.nan, note
    return str(ms[j]), _crossing(ms[j - 1], ratios[j - 1], ms[j], ratios[j]), note


def break_even(points: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (layer, series): break-even M of ``metric`` against bf16."""
    vs = vs_reference(points, metric)
    rows = []
    for (layer, series), g in vs.groupby(["layer", "series"], sort=False):
        g = g.sort_values("m")
        be, cross, note = break_even_one(g["m"].tolist(), g["ratio"].tolist())
        rows.append({"layer": layer, "group": g["group"].iloc[0], "series": series,
                     "metric": METRICS.get(metric, metric), "break_even": be,
                     "crossing_m": cross, "m_min": int(g["m"].min()),
                     "m_max": int(g["m"].max()), "points": len(g), "note": note})
    cols = ["layer", "group", "series", "metric", "break_even", "crossing_m", "m_min", "m_max",
            "points", "note"]
    return pd.DataFrame(rows, columns=cols)


def byte_budget(points: pd.DataFrame, copy_bytes_per_s: float | None) -> pd.DataFrame:
    """Per (layer, quantized path): bytes its 4-bit weight saves against bf16 and, for paths
    with a metered dequantize (bnb-nf4), the bytes and time the dequantization costs.

    ``saved_bytes``: bf16 weight minus the stored 4-bit weight and scales (what a fused path
    avoids reading). ``dequant_bytes``: the dequantize kernel's traffic (reads the 4-bit
    weight, writes bf16), measured alone by bnb-dequant; ``unfused_extra_bytes`` adds the GEMM
    reading the bf16 weight back: what the unfused path moves on top of a fused one. Ideal
    times are bytes over the measured copy bandwidth.
    """
    ok = points[points["status"] == "ok"]
    ref = ok[ok["backend"] == REFERENCE].groupby("layer")["weight_bytes"].first()
    meters = ok[ok["backend"].isin(set(DEQUANT_METERED.values()))]
    dq = meters.groupby(["backend", "layer"])[["bytes", "time_s", "energy_j"]].first()
    rows = []
    for (layer, series), g in quantized(points).groupby(["layer", "series"], sort=False):
        r = g.iloc[0]
        bf16_w = ref.get(layer, math.nan)
        if not math.isfinite(bf16_w):
            bf16_w = float(bf16_gemm(0, int(r["n"]), int(r["k"])).weight)
        stored = r["weight_bytes"] + r["scales_bytes"]
        row = {"layer": layer, "group": r["group"], "series": series, "bf16_weight_bytes": bf16_w,
               "stored_bytes": stored, "saved_bytes": bf16_w - stored,
               "dequant_bytes": math.nan, "unfused_extra_bytes": math.nan,
               "dequant_time_s": math.nan,
               "dequant_energy_j": math.nan, "unfused_from_m": None}
        if r["backend"] in DEQUANT_METERED:
            unfused = g[g["kernels"].map(lambda ks: any(k.get("category") == "dequant"
                                                        for k in ks or ()))]
            row["unfused_from_m"] = int(unfused["m"].min()) if len(unfused) else None
            meter = (DEQUANT_METERED[r["backend"]], layer)
            if meter in dq.index:
                row.update(dequant_bytes=dq.loc[meter, "bytes"],
                           dequant_time_s=dq.loc[meter, "time_s"],
                           dequant_energy_j=dq.loc[meter, "energy_j"])
            else:
                row["dequant_bytes"] = float(sum(nf4_dequantize(n, int(r["k"])).total
                                                 for n in r["shards"]))
            row["unfused_extra_bytes"] = row["dequant_bytes"] + bf16_w
        bw = copy_bytes_per_s
        row["saved_ideal_s"] = row["saved_bytes"] / bw if bw else math.nan
        row["dequant_ideal_s"] = row["dequant_bytes"] / bw if bw else math.nan
        rows.append(row)
    return pd.DataFrame(rows)
