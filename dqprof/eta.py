"""Time left in a long run, from the pace of the work done so far.

Work comes in units with a weight (a measured point 1, a skipped or already recorded one 0;
a full-model run may weigh an engine start as several points). The pace is seconds per unit
of weight since the first unit finished (the first one pays for setup and warm-up and would
skew it); the estimate counts down between updates. ``EtaColumn`` shows it in a rich
progress bar; ``Eta.text()`` writes it in a log line.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.progress import ProgressColumn, Task
from rich.text import Text


def duration(seconds: float) -> str:
    """2h 05m, 3m 20s, 45s: as precise as a person plans with."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


class Eta:
    def __init__(self, total: float, unit: str = "point",
                 clock: Callable[[], float] = time.monotonic):
        self.unit = unit  # what the placeholder before the pace is known counts
        self.total = float(total)  # weight of all the work still to do when it starts
        self.done = 0.0
        self.clock = clock
        self._first: float | None = None  # clock and weight when the first unit finished
        self._first_done = 0.0
        self._last = clock()
        self._pace: float | None = None  # seconds per unit of weight

    def advance(self, weight: float = 1.0) -> None:
        """One unit of work finished."""
        now = self.clock()
        self.done += weight
        self._last = now
        if weight <= 0:
            return
        if self._first is None:
            self._first, self._first_done = now, self.done
            return
        if self.done > self._first_done:
            self._pace = (now - self._first) / (self.done - self._first_done)

    def remaining_s(self) -> float | None:
        """Seconds left, or None before the pace is known."""
        left = max(0.0, self.total - self.done)
        if left == 0:
            return 0.0
        if self._pace is None:
            return None
        return max(0.0, left * self._pace - (self.clock() - self._last))

    def text(self) -> str:
        left = self.remaining_s()
        if left is None:
            return f"ETA after 2 {self.unit}s" if self.total > 1 else "ETA –"
        return f"ETA {duration(left)}"


class EtaColumn(ProgressColumn):
    """The estimate of an ``Eta`` in a rich progress bar (re-read at every refresh)."""

    def __init__(self, eta: Eta):
        super().__init__()
        self.eta = eta

    def render(self, task: Task) -> Text:
        return Text(self.eta.text(), style="progress.remaining")
