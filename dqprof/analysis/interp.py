"""A figure at a token count M that may not have been measured: measured, log-log
interpolated between the two nearest measured M, or (outside the measured range) the nearest
measured M. Never extrapolated. Each value carries the method, so tables can state it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AtM:
    value: float
    m: int  # the M asked for
    method: str  # "measured", "log-interpolated", "nearest"
    m_used: tuple[int, ...]  # the measured M it came from

    @property
    def how(self) -> str:
        if self.method == "measured":
            return f"M={self.m} measured"
        if self.method == "nearest":
            return f"M={self.m} not measured: nearest measured M={self.m_used[0]} used"
        lo, hi = self.m_used
        return f"M={self.m} interpolated in log-log between M={lo} and M={hi}"


def value_at(ms: Sequence[int], values: Sequence[float], m: int) -> AtM | None:
    """The value at ``m`` from measured (M, value) pairs; None when no finite value exists."""
    pts = sorted((int(a), float(v)) for a, v in zip(ms, values, strict=True)
                 if a > 0 and v is not None and math.isfinite(v) and v > 0)
    if not pts:
        return None
    for a, v in pts:
        if a == m:
            return AtM(v, m, "measured", (a,))
    below = [p for p in pts if p[0] < m]
    above = [p for p in pts if p[0] > m]
    if not below or not above:
        a, v = min(pts, key=lambda p: abs(math.log(p[0] / m)))
        return AtM(v, m, "nearest", (a,))
    (m0, v0), (m1, v1) = below[-1], above[0]
    t = math.log(m / m0) / math.log(m1 / m0)
    return AtM(math.exp(math.log(v0) + t * math.log(v1 / v0)), m, "log-interpolated", (m0, m1))


def nearest_m(available: Sequence[int], wanted: Sequence[int]) -> list[tuple[int, int]]:
    """(wanted, used) pairs: each wanted M, or the measured M nearest to it in log space;
    duplicates of a used M are dropped."""
    avail = sorted({int(a) for a in available if a > 0})
    out: list[tuple[int, int]] = []
    for m in wanted:
        if not avail:
            break
        used = min(avail, key=lambda a: abs(math.log(a / m)))
        if used not in [u for _, u in out]:
            out.append((m, used))
    return out
