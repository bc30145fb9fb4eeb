"""How well an energy window knows its energy per call, and when it may stop.

Pure arithmetic on what a window saw (no GPU, no NVML), so the rule is tested on synthetic
counter traces. A window runs from one update ("tick") of NVML's energy counter to a later one:
the energy between them is exact to the counter's 1 mJ. Its calls run in batches whose counts
are exact at the batch boundaries; a tick falls inside a batch, where the calls done by then
are interpolated along that batch's device span. The relative precision of the energy per call
(one standard deviation) adds:

- **spread**: the per-update-interval energy per call scatters (the power's spread when calls
  run at a steady rate, plus any drift in that rate); its standard error over the intervals,
  ``k(n) * std / mean / sqrt(n)``, with ``k(n)`` Student's t factor for one standard deviation
  so that a few intervals do not look more certain than they are (nvbench's ``stdrel`` in
  spirit, on the mean rather than on single samples).
- **edges**: the two ticks' host times are only known to the gap between the counter read that
  still saw the old value and the one that saw the new ("tick-to-host jitter"), and a batch's
  place on the host clock only to the difference between its host and device spans (launch and
  wake-up latency); at the call rate of the edge batch that is a call-count error. Linear
  interpolation inside the edge batch may be off by the intervals' relative spread times the
  interpolated calls. Both are bounds, added linearly.
- **counter**: 1 mJ at each end.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Student's t quantile at 84.13 % (one standard deviation), by degrees of freedom 1..30
_T_1SIGMA = (1.837, 1.321, 1.197, 1.142, 1.111, 1.091, 1.077, 1.067, 1.059, 1.053, 1.048, 1.043,
             1.040, 1.037, 1.034, 1.032, 1.030, 1.029, 1.027, 1.026, 1.024, 1.023, 1.022, 1.021,
             1.020, 1.020, 1.019, 1.018, 1.018, 1.017)
COUNTER_MJ = 1  # the counter's resolution
MIN_INTERVALS = 5  # fewer updates than this: the spread of the intervals is itself too uncertain


def t_factor(dof: int) -> float:
    if dof < 1:
        return math.inf
    return _T_1SIGMA[dof - 1] if dof <= len(_T_1SIGMA) else 1 + 0.5 / dof


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


@dataclass
class Batch:
    """Replays queued back to back and then waited for with one blocking sync."""

    start: float  # host time right before the batch's begin mark and first launch
    calls: int
    end: float | None = None  # host time the sync returned; None while it runs
    device_s: float | None = None  # begin mark -> end mark on the device clock
    gap_before_s: float | None = None  # device time between the previous end mark and this begin

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
    reach = half + (near.slack / 2 if near else 0.0)
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

    @property
    def j_per_call(self) -> float | None:
        return self.joules / self.calls if self.calls > 0 else None


def estimate(ticks: list[Tick], batches: list[Batch], first: int, last: int) -> Estimate:
    """Energy per call between ticks ``first`` and ``last`` and how well it is known."""
    window = ticks[first:last + 1]
    # interval spread first: it also bounds the interpolation at the edges
    counts = [calls_at(k.t, 0.0, batches, 0.0).calls for k in window]
    rows = tuple((b.t - a.t, (b.mj - a.mj) / 1e3, cb - ca)
                 for a, b, ca, cb in zip(window, window[1:], counts, counts[1:], strict=False))
    per_call = [j / c for _, j, c in rows if c > 0]
    n = len(rows)
    rel_sd = math.inf
    if len(per_call) == n and n >= 2 and statistics.fmean(per_call) > 0:
        rel_sd = statistics.stdev(per_call) / statistics.fmean(per_call)
    spread = t_factor(n - 1) * rel_sd / math.sqrt(n) if n >= 2 else math.inf
    interp = rel_sd if math.isfinite(rel_sd) else 1.0
    a = calls_at(window[0].t, window[0].half, batches, interp)
    b = calls_at(window[-1].t, window[-1].half, batches, interp)
    joules = (window[-1].mj - window[0].mj) / 1e3
    calls = b.calls - a.calls
    edges = (a.err + b.err) / calls if calls > 0 else math.inf
    counter = 2 * COUNTER_MJ / 1e3 / joules if joules > 0 else math.inf
    return Estimate(joules, window[-1].t - window[0].t, calls, n, spread + edges + counter,
                    spread, edges, counter, rows)


@dataclass(frozen=True)
class StopRule:
    """Stop on the first tick where J/call is known to ``target``, within [min_s, max_s]."""

    target: float = 0.005
    min_s: float = 0.4
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
