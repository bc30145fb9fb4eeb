"""Energy per kernel category, and this GPU's energy per byte and per FLOP.

Split of one call's measured energy E over the categories of its kernel attribution:
- a bnb-nf4 call whose attribution holds dequantize kernels: the dequant share is the energy
  per call that the bnb-dequant backend measured for the same layer (dequantize kernels alone
  under the energy meter). It is an estimate (another measurement, not this call's), clipped
  to E and flagged. The rest of E is split over the other categories by device-time share.
- every other call: E split by device-time share of its categories.
- a call without attribution: all of E is "unattributed".
Time shares are of the summed kernel device time, not of the call's wall time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dqprof.analysis.frame import DEQUANT_METERED, reference_variant
from dqprof.measure.attribution import CATEGORIES, by_category

UNATTRIBUTED = "unattributed"
ALL_CATEGORIES = (*CATEGORIES, UNATTRIBUTED)
SPLIT_METHOD = ("a bnb-nf4 call whose kernels include dequantize kernels is charged, for "
                "them, the J/call bnb-dequant measured for the same layer (an estimate from "
                "another measurement, clipped to the call's energy); the rest of its energy, "
                "and all energy of other calls, is split over kernel categories by device-time "
                "share")


@dataclass(frozen=True)
class Split:
    joules: dict[str, float]  # per category (NaN values where the call has no energy)
    seconds: dict[str, float]  # kernel device time per category
    method: str  # "dequant from bnb-dequant + time share", "time share", "unattributed"
    estimated: tuple[str, ...] = ()  # categories whose energy comes from another measurement
    clipped: bool = False  # the borrowed dequant energy exceeded the call's and was cut to it


def split_call(energy_j: float, kernels: list[dict] | None,
               dequant_j: float | None = None) -> Split:
    """One call's energy over its kernel categories (see the module doc)."""
    if not kernels:
        return Split({UNATTRIBUTED: energy_j}, {}, "unattributed")
    seconds = by_category(kernels)  # a category this version does not know counts as other
    total = sum(seconds.values())
    if total <= 0:
        return Split({UNATTRIBUTED: energy_j}, seconds, "unattributed")
    if dequant_j is not None and math.isfinite(dequant_j) and seconds["dequant"] > 0 \
            and math.isfinite(energy_j):
        dq = min(dequant_j, energy_j)
        rest = {c: s for c, s in seconds.items() if c != "dequant"}
        rest_s = sum(rest.values())
        joules = {"dequant": dq}
        for c, s in rest.items():
            joules[c] = (energy_j - dq) * s / rest_s if rest_s > 0 else 0.0
        if rest_s <= 0:
            joules["other"] += energy_j - dq
        return Split(joules, seconds, "dequant from bnb-dequant + time share", ("dequant",),
                     clipped=dequant_j > energy_j)
    return Split({c: energy_j * s / total for c, s in seconds.items()}, seconds, "time share")


def dequant_energy(points: pd.DataFrame) -> dict[tuple[str, str, str], float]:
    """Measured J/call of the dequantize-only backends, by (backend, layer, reference variant)."""
    meters = set(DEQUANT_METERED.values())
    dq = points[points["backend"].isin(meters) & (points["status"] == "ok")]
    return {(r.backend, r.layer, reference_variant(r.variant)): r.energy_j
            for r in dq.itertuples() if math.isfinite(r.energy_j)}


def category_frame(points: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (ok point, category) with its time and (split) energy."""
    ok = points[points["status"] == "ok"]
    dq = dequant_energy(points)
    rows = []
    for r in ok.itertuples():
        borrowed = None
        if r.backend in DEQUANT_METERED:
            borrowed = dq.get((DEQUANT_METERED[r.backend], r.layer,
                               reference_variant(r.variant)))
        s = split_call(r.energy_j, r.kernels, borrowed)
        for c in ALL_CATEGORIES:
            if c not in s.joules and c not in s.seconds:
                continue
            rows.append({"layer": r.layer, "group": r.group, "m": r.m, "series": r.series,
                         "backend": r.backend, "variant": r.variant, "category": c,
                         "time_s": s.seconds.get(c, math.nan),
                         "energy_j": s.joules.get(c, 0.0),
                         "estimated": c in s.estimated, "clipped": s.clipped,
                         "method": s.method, "call_time_s": r.time_s,
                         "call_energy_j": r.energy_j})
    cols = ["layer", "group", "m", "series", "backend", "variant", "category", "time_s",
            "energy_j", "estimated", "clipped", "method", "call_time_s", "call_energy_j"]
    return pd.DataFrame(rows, columns=cols)


@dataclass(frozen=True)
class EnergyFit:
    """E_call_above_idle ~= j_per_byte * bytes + j_per_flop * flops, fitted on ok points."""
    j_per_byte: float
    j_per_flop: float
    points: int
    median_rel_err: float  # median |fit - measured| / measured over the points fitted
    method: str = ("least squares on relative residuals (each point weighted by 1/E) over ok "
                   "points with energy above idle; bytes from the byte model")

    @property
    def balance(self) -> float:
        """Intensity (FLOP/byte) at which bytes and FLOPs cost the same energy."""
        return self.j_per_byte / self.j_per_flop if self.j_per_flop > 0 else math.inf


def fit_energy(points: pd.DataFrame) -> EnergyFit | None:
    """The fit, or None with fewer than 3 usable points or no point with FLOPs."""
    ok = points[(points["status"] == "ok") & (points["energy_above_idle_j"] > 0)
                & (points["bytes"] > 0) & points["flops"].notna()]
    if len(ok) < 3 or not (ok["flops"] > 0).any():
        return None
    e = ok["energy_above_idle_j"].to_numpy(float)
    a = np.column_stack([ok["bytes"].to_numpy(float), ok["flops"].to_numpy(float)]) / e[:, None]
    scale = a.max(axis=0)  # columns differ by many decades: solve on scaled columns
    coef, *_ = np.linalg.lstsq(a / scale, np.ones(len(e)), rcond=None)
    coef = coef / scale
    pred = np.column_stack([ok["bytes"], ok["flops"]]).astype(float) @ coef
    return EnergyFit(float(coef[0]), float(coef[1]), len(e),
                     float(np.median(np.abs(pred - e) / e)))
