"""Numbers as the report prints them (SI units, fixed significant digits, NaN as a dash)."""

from __future__ import annotations

import math
from typing import Any

DASH = "–"


def _ok(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def sig(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}g}" if _ok(v) else DASH


def _scaled(v: Any, units: tuple[tuple[float, str], ...]) -> str:
    if not _ok(v):
        return DASH
    for factor, unit in units:
        if abs(v) >= factor:
            return f"{v / factor:.3g} {unit}"
    factor, unit = units[-1]
    return f"{v / factor:.3g} {unit}"


def us(seconds: Any) -> str:
    """A duration in s, ms, µs or ns, whichever reads best."""
    return _scaled(seconds, ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")))


def mj(joules: Any) -> str:
    """An energy in J, mJ or µJ, whichever reads best."""
    return _scaled(joules, ((1.0, "J"), (1e-3, "mJ"), (1e-6, "µJ"), (1e-9, "nJ")))


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def mb(nbytes: Any) -> str:
    return f"{nbytes / 1e6:.3g} MB" if _ok(nbytes) else DASH


def ratio(v: Any) -> str:
    return f"{v:.2f}×" if _ok(v) else DASH


def pct(v: Any) -> str:
    return f"{100 * v:.0f}%" if _ok(v) else DASH


def m_value(v: Any) -> str:
    """A token count that may be missing (None/NaN) or fractional (interpolated)."""
    if not _ok(v):
        return DASH
    return f"{v:.0f}" if float(v).is_integer() else f"≈{v:.3g}"
