"""A simulated GPU, energy counter and host clock for driving the energy feeder on a CPU.

The clock advances only when the feeder works, sleeps or waits; the GPU runs queued replays
back to back at a fixed time each; the counter updates every ``period`` to the energy drawn so
far, each update off by up to ``jitter_s`` (``walk``: from the previous one, a period that
wanders; otherwise from a fixed grid, a driver timer): a board power with Gaussian noise per
``seg_s`` segment while busy, idle power otherwise. Everything is seeded, so a trace is
reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from dqprof.measure.energy import TickHistory
from dqprof.measure.window import Tick


@dataclass
class SimClock:
    t: float = 100.0
    step: float = 1e-6  # host cost of reading the clock (and of the code between reads)
    sleep_extra: float = 5e-5  # an OS sleep overshoots

    def __call__(self) -> float:
        self.t += self.step
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s + self.sleep_extra


@dataclass
class SimGpu:
    clock: SimClock
    replay_s: float = 5e-4  # device time of one replay
    launch_s: float = 4e-6  # host time to queue one replay
    submit_s: float = 5e-6  # queue -> device
    wake_s: float = 1e-5  # device done -> the blocking sync returns
    asynchronous: bool = True
    free_at: float = 0.0
    busy: list[list[float]] = field(default_factory=list)  # merged busy intervals
    log: list[str] = field(default_factory=list)  # the calls the feeder made, in order
    queued: int = 0  # replays queued since the last sync

    def _run(self, seconds: float) -> tuple[float, float]:
        start = max(self.free_at, self.clock.t + self.submit_s)
        end = start + seconds
        if self.busy and start <= self.busy[-1][1] + 1e-12:
            self.busy[-1][1] = end
        else:
            self.busy.append([start, end])
        self.free_at = end
        return start, end

    def launch(self, replays: int) -> None:
        self.log.append(f"launch {replays}")
        self.queued += replays
        for _ in range(replays):
            self.clock.t += self.launch_s
            self._run(self.replay_s)

    def mark(self) -> float:
        self.log.append("mark")
        return max(self.free_at, self.clock.t + self.submit_s)

    def sync(self) -> None:
        self.log.append(f"sync after {self.queued}")
        self.queued = 0
        self.clock.t = max(self.clock.t, self.free_at + self.wake_s)

    def elapsed_s(self, begin: float, end: float) -> float:
        return end - begin

    def calls_done(self, t: float, calls_per_replay: int) -> float:
        busy = sum(max(0.0, min(b, t) - a) for a, b in self.busy)
        return busy / self.replay_s * calls_per_replay


@dataclass
class SimCounter:
    clock: SimClock
    gpu: SimGpu
    busy_w: float = 400.0
    idle_w: float = 100.0
    noise: float = 0.005  # relative power noise per segment
    seg_s: float = 0.01
    period: float = 0.1
    jitter_s: float = 1e-3
    walk: bool = True
    read_s: float = 3e-5  # host time of one counter read (the value is sampled as it starts)
    read_jitter_s: float = 0.0  # ... plus up to this much more, at random
    seed: int = 0
    stuck: bool = False
    _updates: list[float] = field(default_factory=list)
    _segs: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._origin = self.clock.t + self.rng.uniform(0, self.period)
        self._next, self._n = self._origin, 0

    def _power(self, seg: int) -> float:
        if seg not in self._segs:
            self._segs[seg] = self.busy_w * (1 + self.rng.gauss(0, self.noise))
        return self._segs[seg]

    def energy_j(self, t: float) -> float:
        """Energy drawn from time 0 to ``t``: noisy busy power, idle power elsewhere."""
        total, covered = 0.0, 0.0
        for a, b in self.gpu.busy:
            a, b = min(a, t), min(b, t)
            covered += b - a
            s = a
            while s < b:
                seg = math.floor(s / self.seg_s)
                e = min(b, (seg + 1) * self.seg_s)
                total += self._power(seg) * (e - s)
                s = e
        return total + self.idle_w * (t - covered)

    def __call__(self) -> int:
        """A read on the host clock (the reader of the old in-thread feeder)."""
        value = self.sample(self.clock.t)
        self.clock.t += self.read_duration()
        return value

    def read_duration(self) -> float:
        return self.read_s + self.rng.uniform(0, self.read_jitter_s)

    def sample(self, t: float) -> int:
        """The counter's value at host time ``t`` (``t`` never goes back)."""
        while self._next <= t:
            self._updates.append(self._next)
            self._value = int(self.energy_j(self._next) * 1000)
            self._n += 1
            base = self._next + self.period if self.walk else self._origin + self._n * self.period
            self._next = base + self.rng.uniform(-self.jitter_s, self.jitter_s)
        if self.stuck or not self._updates:
            return 1000
        return self._value

    def true_j_per_call(self, calls_per_replay: int) -> float:
        return self.busy_w * self.gpu.replay_s / calls_per_replay


class SimReader(TickHistory):
    """The feeder's reader thread on the simulated clock: reads back to back from ``start``
    on, on its own timeline, caught up to the host's clock whenever the feeder looks."""

    def __init__(self, clock: SimClock, counter: SimCounter, poll_s: float = 2.5e-4) -> None:
        super().__init__()
        self.clock, self.counter, self.poll_s = clock, counter, poll_s
        self._t: float | None = None

    def start(self) -> SimReader:
        self._t = self.last_change = self.clock.t
        self._prev_lo = self._t
        self._last = self.counter.sample(self._t)
        self._t += self.counter.read_duration() + self.poll_s
        return self

    def _catch_up(self) -> None:
        while self._t is not None and self._t < self.clock.t:
            lo = self._t
            value = self.counter.sample(lo)
            hi = lo + self.counter.read_duration()
            self.read_max_s = max(self.read_max_s, hi - lo)
            if value != self._last:
                self.add(Tick(self._prev_lo, hi, value))
                self._last = value
            self._prev_lo, self._t = lo, hi + self.poll_s

    def ticks(self, since: float = -math.inf) -> list[Tick]:
        self._catch_up()
        # a read still in progress at the host's now is not seen yet
        return [k for k in super().ticks(since) if k.hi <= self.clock.t]


def rig(seed: int = 0, **counter: float) -> tuple[SimClock, SimGpu, SimCounter]:
    clock = SimClock()
    gpu = SimGpu(clock)
    return clock, gpu, SimCounter(clock, gpu, seed=seed, **counter)
