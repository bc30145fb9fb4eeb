"""Figures of one run: roofline, energy roofline, time and energy per call against M.

Figures are built on ``matplotlib.figure.Figure`` (no pyplot state), so they render with the
Agg canvas in the CLI and display inline in notebooks. Each function returns the figure.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from dqprof.analysis.energy import EnergyFit
from dqprof.analysis.frame import DEQUANT, REFERENCE
from dqprof.analysis.roofline import Ceilings

UNITS = {"time_s": ("time per call", "µs", 1e6), "energy_j": ("energy per call", "mJ", 1e3)}


def figure(width: float = 8.0, height: float = 5.0) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def palette(series: list[str]) -> dict[str, tuple]:
    """A stable colour per series (bf16 black: the reference)."""
    cmap = colormaps["tab10"]
    others = [s for s in series if not s.startswith(REFERENCE)]
    colours = {s: cmap(i % 10) for i, s in enumerate(others)}
    colours.update({s: (0.0, 0.0, 0.0, 1.0) for s in series if s.startswith(REFERENCE)})
    return colours


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("-", "--", ":", "-.")


def line_styles(series: list[str]) -> dict[str, tuple[str, str]]:
    """(marker, line style) per quantized series, no two alike: paths whose figures coincide
    (Marlin and Machete on the same shapes, GPTQ and AWQ) stay distinguishable where their
    lines lie on top of each other; hollow markers of different shapes show through."""
    others = [s for s in series if not s.startswith(REFERENCE)]
    return {s: (MARKERS[i % len(MARKERS)], DASHES[(i + i // len(MARKERS)) % len(DASHES)])
            for i, s in enumerate(others)}


def m_size(m: np.ndarray | pd.Series) -> np.ndarray:
    """Marker area growing with log2 M (M=1 small, M=4096 large)."""
    return 10 + 9 * np.log2(np.maximum(np.asarray(m, float), 1))


def empty(message: str, width: float = 8.0, height: float = 2.0) -> Figure:
    """A placeholder figure that states why a plot is missing."""
    fig = figure(width, height)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return fig


def log_axis(ax, which: str = "y") -> None:
    """Log scale labelled at 1, 2, 5 x 10^k in plain numbers, no minor ticks: readable when
    the data spans less than a decade, and far cheaper to draw than mathtext labels."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(NullLocator())


def m_ticks(ax, ms: list[int]) -> None:
    """x ticks at the measured M only (at most 8 labels): readable, and cheap to lay out."""
    if not ms:
        return
    shown = ms if len(ms) <= 8 else ms[::math.ceil(len(ms) / 8)]
    ax.set_xticks(shown, [str(m) for m in shown], fontsize=7)
    ax.xaxis.set_minor_locator(NullLocator())


def _m_legend(ax, ms: list[int]) -> None:
    shown = sorted(set(ms))
    if len(shown) > 5:
        shown = [shown[int(i)] for i in np.linspace(0, len(shown) - 1, 5)]
    handles = [ax.scatter([], [], s=m_size([m])[0], color="grey") for m in shown]
    ax.legend(handles, [f"M={m}" for m in shown], loc="lower right", title="marker size",
              fontsize=8, title_fontsize=8)


def roofline(pts: pd.DataFrame, roof: Ceilings | None, series: list[str],
             title: str = "") -> Figure:
    """Achieved TFLOP/s against arithmetic intensity, one colour per path, size per M."""
    fig = figure()
    ax = fig.add_subplot()
    colours = palette(series)
    for s in series:
        p = pts[pts["series"] == s]
        if len(p):
            ax.scatter(p["intensity"], p["flop_per_s"] / 1e12, s=m_size(p["m"]),
                       color=colours[s], alpha=0.75, edgecolors="none", label=s)
    log_axis(ax, "x")
    log_axis(ax, "y")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, byte model's minimum traffic)")
    ax.set_ylabel("achieved TFLOP/s")
    if roof is not None:
        lo = min(pts["intensity"].min(), roof.ridge) / 2 if len(pts) else roof.ridge / 100
        hi = max(pts["intensity"].max(), roof.ridge) * 2 if len(pts) else roof.ridge * 10
        x = np.logspace(math.log10(lo), math.log10(hi), 200)
        ax.plot(x, roof.attainable(x) / 1e12, color="grey", lw=1.5)
        ax.axvline(roof.ridge, color="grey", ls=":", lw=1)
        ax.annotate(f"ridge {roof.ridge:.0f} FLOP/B", (roof.ridge, roof.flop_per_s / 1e12),
                    xytext=(5, -14), textcoords="offset points", fontsize=8)
        ax.text(lo * 1.3, roof.bytes_per_s * lo * 1.3 / 1e12 * 1.4,
                f"copy bandwidth {roof.bytes_per_s / 1e12:.2f} TB/s", fontsize=8,
                rotation_mode="anchor")
        ax.text(hi / 1.3, roof.flop_per_s / 1e12 * 1.1,
                f"bf16 matmul {roof.flop_per_s / 1e12:.0f} TFLOP/s", fontsize=8, ha="right")
    else:
        title += " (no ceilings in run.json: points only)"
    ax.set_title(title or "roofline", fontsize=10)
    ax.add_artist(ax.legend(loc="upper left", fontsize=8))
    if len(pts):
        _m_legend(ax, pts["m"].tolist())
    ax.grid(True, which="major", alpha=0.3)
    return fig


def energy_roofline(points: pd.DataFrame, fit: EnergyFit | None, series: list[str],
                    title: str = "") -> Figure:
    """Energy per FLOP (above idle) against intensity, with the fitted two-term model."""
    p = points[(points["status"] == "ok") & (points["flops"] > 0)
               & (points["energy_above_idle_j"] > 0) & (points["intensity"] > 0)]
    fig = figure()
    ax = fig.add_subplot()
    colours = palette(series)
    for s in series:
        q = p[p["series"] == s]
        if len(q):
            ax.scatter(q["intensity"], q["energy_above_idle_j"] / q["flops"] * 1e12,
                       s=m_size(q["m"]), color=colours[s], alpha=0.75, edgecolors="none",
                       label=s)
    log_axis(ax, "x")
    log_axis(ax, "y")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("energy above idle per FLOP (pJ / FLOP)")
    if fit is not None and len(p):
        x = np.logspace(math.log10(p["intensity"].min() / 2),
                        math.log10(p["intensity"].max() * 2), 200)
        ax.plot(x, (fit.j_per_byte / x + fit.j_per_flop) * 1e12, color="grey", lw=1.5,
                label="fit: a/I + b")
        text = (f"fit E = a·bytes + b·FLOPs (N={fit.points}):\n"
                f"a = {fit.j_per_byte * 1e12:.1f} pJ/byte, b = {fit.j_per_flop * 1e12:.3f} "
                f"pJ/FLOP\nbalance a/b = {fit.balance:.0f} FLOP/byte; "
                f"median |error| {100 * fit.median_rel_err:.0f}%")
        ax.text(0.98, 0.97, text, transform=ax.transAxes, ha="right", va="top", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "grey"})
        if fit.j_per_byte <= 0 or fit.j_per_flop <= 0:
            ax.text(0.98, 0.75, "a fitted term is <= 0: the two-term model does not fit",
                    transform=ax.transAxes, ha="right", fontsize=8, color="red")
    ax.set_title(title or "energy roofline (Choi et al. 2013)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def per_shape(points: pd.DataFrame, metric: str, series: list[str], title: str = "") -> Figure:
    """``metric`` per call against M, one panel per layer, one line per path (bf16 black);
    the dequantize-only backend as a horizontal dotted line (it does not depend on M)."""
    name, unit, scale = UNITS[metric]
    ok = points[(points["status"] == "ok") & points[metric].notna()]
    layers = list(dict.fromkeys(ok["layer"]))
    cols = min(3, max(1, len(layers)))
    rows = max(1, math.ceil(len(layers) / cols))
    fig = figure(4.2 * cols, 3.2 * rows)
    colours = palette(series)
    styles = line_styles(series)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    ms = sorted(m for m in ok["m"].unique() if m > 0)
    for ax, layer in zip(axes.flat, layers, strict=False):
        lay = ok[ok["layer"] == layer]
        for s in series:
            q = lay[lay["series"] == s].sort_values("m")
            if q.empty:
                continue
            if s.startswith(DEQUANT):
                ax.axhline(q[metric].iloc[0] * scale, color=colours[s], ls=":", lw=1.5,
                           label=f"{s} (dequantize alone)")
                continue
            ref = s.startswith(REFERENCE)
            marker, dash = ("o", "--") if ref else styles[s]
            ax.plot(q["m"], q[metric] * scale, marker=marker, ms=3 if ref else 5,
                    mfc="none" if not ref else colours[s], color=colours[s],
                    lw=2.2 if ref else 1.2, ls=dash, label=f"{s} (reference)" if ref else s)
        ax.set_xscale("log", base=2)
        log_axis(ax, "y")
        m_ticks(ax, ms)
        ax.tick_params(labelbottom=True)  # sharex hides them above empty panels otherwise
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("M (tokens per call)")
        ax.set_ylabel(f"{name} ({unit})")
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=min(4, len(handles)), fontsize=8)
    fig.suptitle(title or f"{name} against M", fontsize=11)
    return fig
