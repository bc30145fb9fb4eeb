"""How well an energy window knows its energy per call, and when it may stop.

Pure arithmetic on what a window saw (no GPU, no NVML), so the rule is tested on synthetic
counter traces. A window runs from one update ("tick") of NVML's energy counter to a later one:
the energy between them is exact to the counter's 1 mJ. Its calls run in batches whose counts
are exact at the batch boundaries; a tick falls inside a batch, where the calls done by then
are interpolated along that batch's device span. The relative precision of the energy per call
(one standard deviation) adds:

- **spread**: the per-update-interval energy per call scatters (the power's spread when calls
  run at a steady rate, plus any drift in that rate); its standard error over the intervals,
  ``k(n) * std / mean / sqrt(n)``, with ``k(n)`` an upper confidence factor on the standard
  deviation (``sd_factor``) so that a few intervals do not look more certain than they are
  (nvbench's ``stdrel`` in spirit, on the mean rather than on single samples).
- **edges**: the two ticks' host times are only known to the gap between the counter read that
  still saw the old value and the one that saw the new ("tick-to-host jitter"), and a batch's
  place on the host clock only to the difference between its host and device spans (launch and
  wake-up latency); at the call rate of the edge batch that is a call-count error. Linear
  interpolation inside the edge batch may be off by the intervals' relative spread times the
  interpolated calls. Both are bounds, added linearly for each end.
- **counter**: 1 mJ at each end, taken whole.

The parts are combined as standard uncertainties (root sum of squares, GUM style): the edge
bounds count as rectangular distributions (a bound ``h`` is ``h / sqrt(3)``), the spread is
already a standard error.

**On the counter's period.** A tick's host time is only known to the gap between two counter
reads, and one read of NVML's counter takes up to 19 ms on the H200: raw edges cost 0.7-5.6 %
(median 1.1 %) of a 1 s window there, and the same host jitter showed up again as the
intervals' spread (median 3.0 %): the energy per update interval of a steady kernel scattered
0.3-1 % while the intervals' host durations scattered 10-20 %
(profiles/h200/session5/feeder-fix.kernels.jsonl). The driver updates the counter on a fixed
period, so the window is placed on a grid ``t0 + n * period`` that passes within
``FIT_JITTER_S`` of every tick's bounds, with the period also bounded by the reader's longer
history (``period_bounds``): the window's length is then known to the period's bounds and the
jitter, and only its place (which barely moves the calls of a steadily fed GPU) to the reads.
The intervals' spread is taken on the grid too, so it is the power's. When no grid fits (the
counter is not periodic to that tolerance) the ticks' raw bounds are used, and the estimate
says which (``fitted``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np

COUNTER_MJ = 1  # the counter's resolution
DECISIVE_Z = 2.0  # the stopping rule bounds the intervals' spread at this many sigmas
# fewer updates than this: the spread of the intervals is itself too uncertain (sd_factor
# widens it for few; on the simulated counter 3 kept the stated precision's coverage)
MIN_INTERVALS = 3
# Tick fit: how far a true update may sit off the grid of its neighbours. The H200's counter
# moved by a steady kernel's energy per interval to 0.3-1 % (0.3-1 ms of its 100 ms period)
# with power noise included, so 0.5 ms; a counter less regular than that fails the fit and
# keeps its raw bounds (never a tighter claim than the reads allow)
FIT_JITTER_S = 5e-4


def chi2_cdf(x: float, dof: int) -> float:
    """P(chi-square with ``dof`` degrees of freedom <= x): the regularized lower incomplete
    gamma function by its power series (converges for every x; dof here is small)."""
    if x <= 0:
        return 0.0
    a, h = dof / 2, x / 2
    term = total = 1 / a
    for k in range(1, 1000):
        term *= h / (a + k)
        total += term
        if term < total * 1e-15:
            break
    return min(1.0, total * math.exp(a * math.log(h) - h - math.lgamma(a)))


@lru_cache(maxsize=256)
def sd_factor(dof: int, z: float = 1.0) -> float:
    """How much larger the standard deviation may be than the one seen, at the one-sided
    confidence of ``z`` sigmas (z = 1: 84 %): sqrt(dof / the chi-square quantile). An upper
    bound rather than Student's t, since a window stops on the first update where the
    precision looks good enough (``Estimate.decisive``)."""
    if dof < 1:
        return math.inf
    p = 0.5 * math.erfc(z / math.sqrt(2))  # the lower tail beyond z sigmas
    lo, hi = 0.0, float(dof)
    while chi2_cdf(hi, dof) < p:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_cdf(mid, dof) < p else (lo, mid)
    return math.sqrt(dof / hi)


@dataclass(frozen=True)
class Tick:
    """One counter update, seen by the host between ``lo`` and ``hi`` (host seconds)."""

    lo: float  # start of the last read that still returned the old value
    hi: float  # end of the read that returned ``mj``
    mj: int

    @property
    def t(self) -> float:
        return (self.lo + self.hi) / 2

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2


def grid_slots(ticks: list[Tick]) -> list[int] | None:
    """Each tick's update number on the counter's period, or None where it is not periodic."""
    if len(ticks) < 3:
        return None
    steps = [b.t - a.t for a, b in zip(ticks, ticks[1:], strict=False)]
    period = statistics.median(steps)
    if not period > 0:
        return None
    # steps of whole periods only (a read held up for longer can hide an update); anything
    # else means the counter is not updating on a period
    if any(abs(s / period - round(s / period)) > 0.2 or round(s / period) < 1 for s in steps):
        return None
    slots = [0]
    for s in steps:
        slots.append(slots[-1] + round(s / period))
    return slots


def period_bounds(ticks: list[Tick], jitter: float = FIT_JITTER_S) -> tuple[float, float] | None:
    """The periods for which some grid ``t0 + n * period`` passes within ``jitter`` of every
    tick's bounds: an interval (the condition is convex in the period), or None when no
    period fits (the counter does not update on a period to that tolerance)."""
    slots = grid_slots(ticks)
    if slots is None or slots[-1] < 2:
        return None
    n = np.array(slots, dtype=float)
    lo = np.array([k.lo for k in ticks]) - jitter
    hi = np.array([k.hi for k in ticks]) + jitter

    def excess(p: float) -> float:  # > 0: no t0 fits this period
        return float(np.max(lo - n * p) - np.min(hi - n * p))

    p0 = (ticks[-1].t - ticks[0].t) / slots[-1]
    a, b = 0.9 * p0, 1.1 * p0
    for _ in range(100):  # the minimum of a convex function
        m1, m2 = a + (b - a) / 3, b - (b - a) / 3
        a, b = (a, m2) if excess(m1) < excess(m2) else (m1, b)
    best = (a + b) / 2
    if excess(best) > 0:
        return None

    def edge(inside: float, outside: float) -> float:
        if excess(outside) <= 0:
            return outside
        for _ in range(60):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if excess(mid) <= 0 else (inside, mid)
        return inside

    return edge(best, 0.9 * p0), edge(best, 1.1 * p0)


@lru_cache(maxsize=1024)
def _polygon(obs: tuple[tuple[int, float, float], ...], period: tuple[float, float] | None,
             jitter: float) -> tuple[tuple[float, float], ...]:
    """Vertices (t0, period) of the grids within ``jitter`` of every observation
    (slot, lo, hi) and, if given, with the period inside ``period``; empty when none fits.
    A 2-D linear program: extremes of any linear quantity lie on these vertices."""
    eps = 1e-9
    tick_lines = [(n, lo - jitter) for n, lo, _ in obs] + [(n, hi + jitter) for n, _, hi in obs]
    candidates = []
    for (n1, c1), (n2, c2) in combinations(tick_lines, 2):
        if n1 != n2:
            p = (c2 - c1) / (n2 - n1)
            candidates.append((c1 - n1 * p, p))
    if period is not None:
        candidates = [(t0, p) for t0, p in candidates if period[0] - eps <= p <= period[1] + eps]
        candidates += [(c - n * p, p) for n, c in tick_lines for p in period]
    return tuple((t0, p) for t0, p in candidates
                 if all(lo - jitter - eps <= t0 + n * p <= hi + jitter + eps for n, lo, hi in obs))


@dataclass
class Batch:
    """Replays queued back to back and then waited for with one blocking sync."""

    start: float  # host time right before the batch's begin mark and first launch
    calls: int
    end: float | None = None  # host time the sync returned; None while it runs
    device_s: float | None = None  # begin mark -> end mark on the device clock
    gap_before_s: float | None = None  # device time between the previous end mark and this begin
    gap_inside_s: float = 0.0  # device idle between its bridge and the rest (energy.py)

    @property
    def slack(self) -> float:
        """Host span less device span: how loosely the batch sits on the host clock."""
        if self.end is None or self.device_s is None:
            return 0.0
        return max(0.0, self.end - self.start - self.device_s)

    def runs(self) -> tuple[float, float]:
        """Where the device ran it on the host clock (the middle of what the slack allows)."""
        begin = self.start + self.slack / 2
        return begin, begin + (self.device_s or 0.0)


@dataclass(frozen=True)
class Edge:
    calls: float  # calls done by the tick
    err: float  # bound on that count's error (time jitter + interpolation)


def _count(t: float, batches: list[Batch]) -> tuple[float, int | None, float]:
    """Calls done by host time ``t``; the batch running then and its part done, if any."""
    done = 0.0
    for i, b in enumerate(batches):
        begin, end = b.runs()
        if t < begin:
            break
        if t < end and b.device_s:
            part = b.calls * (t - begin) / b.device_s
            return done + part, i, part
        done += b.calls
    return done, None, 0.0


def _nearest(t: float, batches: list[Batch]) -> Batch | None:
    def distance(b: Batch) -> float:
        begin, end = b.runs()
        return max(begin - t, t - end, 0.0)

    return min(batches, key=distance, default=None)


def calls_at(t: float, half: float, batches: list[Batch], spread: float) -> Edge:
    """Calls done by host time ``t`` (known to +-``half``), interpolated inside its batch."""
    calls, i, part = _count(t, batches)
    near = batches[i] if i is not None else _nearest(t, batches)
    # an idle gap inside a batch moves its calls off the straight line by up to that much
    reach = half + (near.slack / 2 + near.gap_inside_s if near else 0.0)
    err = max(_count(t + reach, batches)[0] - calls, calls - _count(t - reach, batches)[0])
    if i is not None:
        err += spread * min(part, batches[i].calls - part)
    return Edge(calls, err)


@dataclass(frozen=True)
class Estimate:
    joules: float
    seconds: float
    calls: float
    intervals: int
    precision: float  # relative, one standard deviation; inf when it cannot be told
    spread: float
    edges: float
    counter: float
    interval_rows: tuple[tuple[float, float, float], ...]  # (seconds, joules, calls) per update
    fitted: bool = False  # the window was placed on the counter's period (module docstring)
    # the precision with the spread bounded at DECISIVE_Z sigmas instead of 1: what the rule
    # stops on. Stopping on the first update whose spread looks small enough picks windows
    # whose spread was small by chance; on the simulated counter at 3 % power noise, stopping
    # on ``precision`` left 58 % of windows within one stated sigma and 87 % within two,
    # stopping on this 60 % and 90 % (fixed-length windows: 70 % and 97 %)
    decisive: float = math.inf

    @property
    def j_per_call(self) -> float | None:
        return self.joules / self.calls if self.calls > 0 else None


def estimate(ticks: list[Tick], batches: list[Batch], first: int, last: int,
             period: tuple[float, float] | None = None) -> Estimate:
    """Energy per call between ticks ``first`` and ``last`` and how well it is known.

    ``period``: bounds on the counter's period from a longer history (``period_bounds`` over
    a reader's past ticks). The grid uses every tick up to ``last`` (those before the window
    too): what the stopping rule knew when it decided, so the decision and the final figure
    agree.
    """
    seen = ticks[:last + 1]
    slots = grid_slots(seen)
    verts = ()
    if slots is not None:
        obs = tuple((n, k.lo, k.hi) for n, k in zip(slots, seen, strict=True))
        verts = _polygon(obs, period, FIT_JITTER_S)
    raw = _estimate_raw(ticks, batches, first, last)
    if not verts:
        return raw
    # the grid: the middle of what the polygon allows; how far its vertices move the calls
    # in the window is the placement's bound, the jitter off the grid each end's own
    t0 = statistics.fmean(v[0] for v in verts)
    per = statistics.fmean(v[1] for v in verts)
    sf, sl = slots[first], slots[last]
    ns = slots[first:last + 1]
    grid = [t0 + n * per for n in ns]
    mjs = [k.mj for k in seen[first:]]
    counts = [calls_at(t, 0.0, batches, 0.0).calls for t in grid]
    rows = tuple(((n1 - n0) * per, (m1 - m0) / 1e3, c1 - c0) for n0, n1, m0, m1, c0, c1
                 in zip(ns, ns[1:], mjs, mjs[1:], counts, counts[1:], strict=False))
    spread, strict, rel_sd = _spread(rows)
    interp = rel_sd if math.isfinite(rel_sd) else 1.0
    placed = [calls_at(v0 + sl * vp, 0.0, batches, 0.0).calls
              - calls_at(v0 + sf * vp, 0.0, batches, 0.0).calls for v0, vp in verts]
    a = calls_at(grid[0], FIT_JITTER_S, batches, interp)
    b = calls_at(grid[-1], FIT_JITTER_S, batches, interp)
    calls = b.calls - a.calls
    place = (max(placed) - min(placed)) / 2
    edges = (math.sqrt(place**2 + a.err**2 + b.err**2) / math.sqrt(3) / calls
             if calls > 0 else math.inf)
    joules = (seen[last].mj - seen[first].mj) / 1e3
    fitted = _finish(joules, (sl - sf) * per, calls, rows, spread, strict, edges, fitted=True)
    # both hold (the grid only under its jitter); ticks read more tightly than the jitter
    # are better on their own
    return fitted if fitted.precision <= raw.precision else raw


def _estimate_raw(ticks: list[Tick], batches: list[Batch], first: int, last: int) -> Estimate:
    """The estimate on the ticks' own host bounds (no period fits them)."""
    window = ticks[first:last + 1]
    counts = [calls_at(k.t, 0.0, batches, 0.0).calls for k in window]
    rows = tuple((b.t - a.t, (b.mj - a.mj) / 1e3, cb - ca)
                 for a, b, ca, cb in zip(window, window[1:], counts, counts[1:], strict=False))
    spread, strict, rel_sd = _spread(rows)
    interp = rel_sd if math.isfinite(rel_sd) else 1.0
    a = calls_at(window[0].t, window[0].half, batches, interp)
    b = calls_at(window[-1].t, window[-1].half, batches, interp)
    calls = b.calls - a.calls
    # each end's bound as a rectangular distribution; the two ends are independent
    edges = math.hypot(a.err, b.err) / math.sqrt(3) / calls if calls > 0 else math.inf
    joules = (window[-1].mj - window[0].mj) / 1e3
    return _finish(joules, window[-1].t - window[0].t, calls, rows, spread, strict, edges,
                   fitted=False)


def _spread(rows: tuple[tuple[float, float, float], ...]) -> tuple[float, float, float]:
    """(standard error of the mean energy per call with the intervals' sd bounded at one
    sigma, the same at two, the intervals' relative sd)."""
    per_call = _per_call(rows)
    n = len(per_call)
    if n < 2 or not statistics.fmean(per_call) > 0:
        return math.inf, math.inf, math.inf
    rel_sd = statistics.stdev(per_call) / statistics.fmean(per_call)
    sem = rel_sd / math.sqrt(n)
    return sd_factor(n - 1) * sem, sd_factor(n - 1, DECISIVE_Z) * sem, rel_sd


def _finish(joules: float, seconds: float, calls: float,
            rows: tuple[tuple[float, float, float], ...], spread: float, strict: float,
            edges: float, fitted: bool) -> Estimate:
    counter = math.sqrt(2) * COUNTER_MJ / 1e3 / joules if joules > 0 else math.inf
    precision = math.sqrt(spread**2 + edges**2 + counter**2)
    return Estimate(joules, seconds, calls, len(rows), precision, spread, edges, counter, rows,
                    fitted, math.sqrt(strict**2 + edges**2 + counter**2))


def _per_call(rows: tuple[tuple[float, float, float], ...]) -> list[float]:
    """Energy per call of each update interval; one that ran no call (the host held the
    device between two batches, as a loaded CPU can) is joined to the next."""
    out, joules, calls = [], 0.0, 0.0
    for _, j, c in rows:
        joules, calls = joules + j, calls + c
        if calls > 0:
            out.append(joules / calls)
            joules, calls = 0.0, 0.0
    return out


@dataclass(frozen=True)
class StopRule:
    """Stop on the first tick where J/call is known to ``target``, within [min_s, max_s]."""

    target: float = 0.005
    min_s: float = 0.3
    max_s: float = 1.0
    min_intervals: int = MIN_INTERVALS

    def decide(self, intervals: int, seconds: float, precision: float) -> str | None:
        """'precise', 'max' (the longest window: stop whatever it reached) or None (go on)."""
        if (intervals >= self.min_intervals and seconds >= self.min_s
                and precision <= self.target):
            return "precise"
        if seconds >= self.max_s:
            return "max"
        return None
