"""Bar figures: the dequantization tax by kernel category, per-layer energy per token,
run-against-run ratios, and bnb-nf4's excess split into format and path."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from dqprof.analysis.breakdown import GROUPS, Scenario, upper_bounds
from dqprof.analysis.energy import ALL_CATEGORIES
from dqprof.analysis.frame import REFERENCE
from dqprof.analysis.plots import UNITS, figure, log_axis, m_ticks, palette

CATEGORY_COLOURS = {"dequant": "#d62728", "gemm": "#1f77b4", "cast/copy": "#ff7f0e",
                    "quantize": "#9467bd", "other": "#7f7f7f", "unattributed": "#c7c7c7"}
GROUP_COLOURS = dict(zip(GROUPS, ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974",
                                  "#64b5cd"), strict=True))
# the tax plot's paths: bf16, the runtime-dequant path, and the fused 4-bit GEMMs it is
# judged against (series whose names start with these)
TAX_PATHS = (REFERENCE, "bnb-nf4", "marlin", "triton-nf4")


def tax_series(series: list[str]) -> list[str]:
    return [s for s in series if s.startswith(TAX_PATHS)]


def tax(cats: pd.DataFrame, layer: str, ms: list[tuple[int, int]], series: list[str],
        metric: str = "energy_j") -> Figure:
    """Per-call ``metric`` stacked by kernel category, one panel per M, one bar per path.
    ``ms``: (wanted M, measured M used) pairs. Hatched: an estimate from another measurement."""
    name, unit, scale = UNITS[metric]
    fig = figure(2.6 * max(1, len(ms)) + 1.5, 4.2)
    axes = fig.subplots(1, max(1, len(ms)), squeeze=False)[0]  # own y: M spans decades
    lay = cats[cats["layer"] == layer]
    estimated_any = False
    for ax, (wanted, used) in zip(axes, ms, strict=False):
        at = lay[lay["m"] == used]
        names = [s for s in series if (at["series"] == s).any()]
        bottoms = np.zeros(len(names))
        for c in ALL_CATEGORIES:
            vals, hatch = [], []
            for s in names:
                row = at[(at["series"] == s) & (at["category"] == c)]
                v = row[metric].sum() if len(row) else 0.0
                vals.append(0.0 if not math.isfinite(v) else v * scale)
                hatch.append(bool(len(row)) and bool(row["estimated"].any()))
            bars = ax.bar(range(len(names)), vals, bottom=bottoms, color=CATEGORY_COLOURS[c],
                          edgecolor="white", lw=0.5)
            for b, h in zip(bars, hatch, strict=True):
                if h and metric == "energy_j":
                    b.set_hatch("//")
                    estimated_any = True
            bottoms += np.array(vals)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"M={used}" + ("" if used == wanted else f" (nearest to {wanted})"),
                     fontsize=9)
        ax.margins(y=0.08)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_ylabel(f"{name} ({unit})")
    handles = [Patch(color=CATEGORY_COLOURS[c], label=c) for c in ALL_CATEGORIES
               if (lay["category"] == c).any()]
    if estimated_any:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                             label="estimate: bnb-dequant's J/call"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    what = "energy" if metric == "energy_j" else "kernel device time"
    fig.suptitle(f"dequantization tax, {layer}: {what} per call by kernel category", fontsize=10)
    return fig


def per_token(tables: dict[Scenario, pd.DataFrame], metric: str, series: list[str],
              refs: dict[str, str] | None = None) -> Figure:
    """Per-token ``metric`` of all linears, stacked by layer group, one panel per scenario;
    labels: total over the path's bf16 reference (``refs``: series -> bf16 series; default
    "bf16"). Dotted segments: layers the path leaves to bf16 (the bf16 record is used)."""
    name, unit, scale = UNITS[metric]
    label = "energy per token" if metric == "energy_j" else "device time per token"
    scen = [s for s, t in tables.items() if not t.empty]
    fig = figure(3.0 * max(1, len(scen)) + 1.6, 4.4)
    axes = fig.subplots(1, max(1, len(scen)), squeeze=False)[0]
    groups_seen: list[str] = []
    for ax, sc in zip(axes, scen, strict=False):
        t = tables[sc]
        names = [s for s in series if (t["series"] == s).any()]
        bottoms = np.zeros(len(names))
        groups = [g for g in GROUPS if (t["group"] == g).any()]
        groups += [g for g in dict.fromkeys(t["group"]) if g not in groups]
        for g in groups:
            groups_seen += [g] if g not in groups_seen else []
            vals, subst = [], []
            for s in names:
                rows = t[(t["series"] == s) & (t["group"] == g)]
                vals.append(rows["per_token"].sum() * scale)
                subst.append(bool(rows["substituted"].any()))
            bars = ax.bar(range(len(names)), vals, bottom=bottoms,
                          color=GROUP_COLOURS.get(g, "#999999"), edgecolor="white", lw=0.5)
            for b, sub in zip(bars, subst, strict=True):
                if sub:
                    b.set_hatch("..")
            bottoms += np.array(vals)
        totals = dict(zip(names, bottoms, strict=True))
        bounded = upper_bounds(t)
        for i, s in enumerate(names):
            ref = totals.get((refs or {}).get(s, REFERENCE))
            if ref:
                # upright labels collide beyond a few bars: stand them on end there
                le = "≤" if s in bounded else ""  # a layer's energy window idled
                ax.text(i, totals[s], f" {le}{totals[s] / ref:.2f}×", ha="center", va="bottom",
                        fontsize=7, rotation=90 if len(names) > 6 else 0)
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) <= 6 else 60,
                      ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_title(sc.label, fontsize=9)
        ax.margins(y=0.18 if len(names) > 6 else 0.1)  # room for the ratio labels
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_ylabel(f"{label} ({unit}/token)")
    handles = [Patch(color=GROUP_COLOURS.get(g, "#999999"), label=g) for g in groups_seen]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="..",
                         label="bf16 record (layer stays bf16)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.suptitle(f"linears, {label} by layer group (labels: × bf16; ≤: an upper bound, a "
                 f"layer's energy window idled)" if any(upper_bounds(t) for t in tables.values())
                 else f"linears, {label} by layer group (labels: × bf16)", fontsize=10)
    return fig


def compare(by_m: pd.DataFrame, aligned: pd.DataFrame, figure_name: str, base: str,
            series: list[str]) -> Figure:
    """Ratio (run / baseline) of ``figure_name`` against M: geometric mean over layers per
    path (lines) and every layer (faint points); one panel per compared run."""
    name, _, _ = UNITS[figure_name]
    runs = list(dict.fromkeys(by_m["run"]))
    fig = figure(5.0 * max(1, len(runs)), 4.2)
    axes = fig.subplots(1, max(1, len(runs)), squeeze=False)[0]
    colours = palette(series)
    for ax, run in zip(axes, runs, strict=False):
        for s in series:
            q = by_m[(by_m["run"] == run) & (by_m["series"] == s)].sort_values("m")
            q = q[q["ratio"].notna()]
            if q.empty:
                continue
            a = aligned[(aligned["run"] == run) & (aligned["series"] == s)]
            ax.scatter(a["m"], a[f"{figure_name}_ratio"], s=8, color=colours[s], alpha=0.25)
            ax.plot(q["m"], q["ratio"], marker="o", ms=3, color=colours[s], label=s)
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        log_axis(ax, "y")
        m_ticks(ax, sorted(by_m["m"].unique()))
        ax.set_xlabel("M (tokens per call)")
        ax.set_ylabel(f"{name}: {run} / {base}")
        ax.set_title(f"{run} against {base}", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    return fig


PART_COLOURS = {"path": "#d62728", "format": "#1f77b4"}


def format_path(splits: dict[str, pd.DataFrame], ms: list[int], nf4: str = "bnb-nf4",
                fused: str = "triton-nf4") -> Figure:
    """Per layer, bnb-nf4's excess over the best int4 path split into path (bnb-nf4 −
    triton-nf4) and format (triton-nf4 − best), signed (a negative part is drawn left of 0);
    one row of panels per metric in ``splits`` (format_path.point_splits), one column per M.
    Diamonds: the gap itself; the label beside it names the best path."""
    metrics = list(splits)
    fig = figure(4.6 * max(1, len(ms)) + 1.8, 0.9 + 2.9 * max(1, len(metrics)))
    axes = fig.subplots(max(1, len(metrics)), max(1, len(ms)), squeeze=False)
    for row, metric in zip(axes, metrics, strict=False):
        name, unit, scale = UNITS[metric]
        p = splits[metric]
        for ax, m in zip(row, ms, strict=False):
            at = p[(p["m"] == m)].reset_index(drop=True)
            y = np.arange(len(at))
            for j, part in enumerate(("path", "format")):
                vals = at[part].to_numpy(float) * scale  # NaN (a figure missing): no bar
                ax.barh(y + (j - 0.5) * 0.38, vals, height=0.38, color=PART_COLOURS[part])
            gap = at["gap"].to_numpy(float) * scale
            ax.scatter(gap, y, marker="D", s=14, color="black", zorder=3)
            for yi, (g, best) in enumerate(zip(gap, at["best_series"], strict=True)):
                if np.isfinite(g) and best:
                    ax.annotate(best, (g, yi), xytext=(4, 0), textcoords="offset points",
                                fontsize=6, va="center")
            ax.axvline(0, color="grey", lw=0.8)
            ax.set_yticks(y, at["layer"], fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(f"{name} ({unit})", fontsize=8)
            ax.set_title(f"M={m}, {name}", fontsize=9)
            ax.grid(True, axis="x", alpha=0.3)
            ax.margins(x=0.15)
    handles = [Patch(color=PART_COLOURS["path"], label=f"path: {nf4} − {fused}"),
               Patch(color=PART_COLOURS["format"], label=f"format: {fused} − best int4"),
               Line2D([], [], marker="D", ls="", color="black", label=f"gap: {nf4} − best")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.suptitle(f"format or path: {nf4}'s excess over the best fused int4 path, per call",
                 fontsize=10)
    return fig
