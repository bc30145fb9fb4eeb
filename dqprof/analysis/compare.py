"""Two or more runs side by side (two GPUs, two library versions), aligned by
(layer, M, backend, variant); every run is compared with the first (the baseline)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dqprof.analysis.frame import KEY, Run
from dqprof.errors import DqprofError

FIGURES = ("time_s", "energy_j")


def align(runs: list[Run]) -> tuple[pd.DataFrame, list[str]]:
    """Long table, one row per (point present and ok in the baseline and another run), with
    both figures and their ratio (other / baseline); and what could not be aligned."""
    if len(runs) < 2:
        raise DqprofError("a comparison needs two or more run folders")
    base, notes = runs[0], []
    models = {r.label: r.model for r in runs}
    if len(set(models.values())) > 1:
        notes.append("runs profile different models (" + ", ".join(
            f"{k}: {v}" for k, v in models.items()) + "): only layer names that match align")
    b = base.ok[KEY + ["series", "group", *FIGURES]]
    frames = []
    for other in runs[1:]:
        o = other.ok[KEY + list(FIGURES)]
        only_b = set(base.ok["series"]) - set(other.ok["series"])
        only_o = set(other.ok["series"]) - set(base.ok["series"])
        for s in sorted(only_b):
            notes.append(f"{s}: in {base.label}, missing from {other.label}: not compared")
        for s in sorted(only_o):
            notes.append(f"{s}: in {other.label}, missing from {base.label}: not compared")
        j = b.merge(o, on=KEY, suffixes=("_base", "_other"))
        if j.empty:
            notes.append(f"{base.label} vs {other.label}: no ok point in common: not compared")
            continue
        unmatched = len(b) + len(o) - 2 * len(j)
        if unmatched:
            notes.append(f"{base.label} vs {other.label}: {len(j)} common points; {unmatched} "
                         f"points measured in only one of them are not compared")
        j.insert(0, "run", other.label)
        for f in FIGURES:
            j[f"{f}_ratio"] = j[f"{f}_other"] / j[f"{f}_base"]
        frames.append(j)
    if not frames:
        labels = ", ".join(r.label for r in runs)
        raise DqprofError(f"runs {labels} have no ok point in common (matched on layer, M, "
                          f"backend and variant): nothing to compare")
    return pd.concat(frames, ignore_index=True), notes


def _geomean(x: pd.Series) -> float:
    x = x[np.isfinite(x) & (x > 0)]
    return float(np.exp(np.log(x).mean())) if len(x) else math.nan


def ratio_summary(aligned: pd.DataFrame) -> pd.DataFrame:
    """Per (run, series): geometric-mean ratio of time and energy over the common points."""
    g = aligned.groupby(["run", "series"], sort=False)
    return pd.DataFrame({
        "points": g.size(),
        "time_ratio": g["time_s_ratio"].agg(_geomean),
        "energy_ratio": g["energy_j_ratio"].agg(_geomean),
    }).reset_index()


def ratio_by_m(aligned: pd.DataFrame, figure: str) -> pd.DataFrame:
    """Per (run, series, M): geometric-mean ratio of ``figure`` over layers."""
    return (aligned.groupby(["run", "series", "m"], sort=False)[f"{figure}_ratio"]
            .agg(_geomean).rename("ratio").reset_index())
