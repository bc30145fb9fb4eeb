"""Energy per call from the NVML total-energy counter, over windows aligned to its ticks.

The counter (millijoules) only moves when the driver updates it (about every 100 ms on an
H200), so a window read at arbitrary times is off by up to one update at each end. Here the
window opens on a counter update while the GPU runs the point's replays and closes on a later
one, so its energy and duration are exact to the counter; it closes on the first update where
the energy per call is known to the target precision (``window.py``), within a minimum and a
maximum length.

The feeder ("batch-sync"): replays are queued in batches of about ``BATCH_S`` of device time
and each batch is waited for with one blocking ``synchronize``; nothing else is ever waited on
or polled on the device. Calls are exact at batch boundaries; two timing events per batch, at
its edges and read only after its sync, give each batch's device span and the device idle time
between batches. The counter is read on a thread of its own (``TickReader``), back to back
all window long: one read of it takes up to 19 ms on the H200, and read on the feeding thread
it either held back the sync (the GPU idled a median 5 % when reads ran to 95 % of each batch)
or, stopped three of the slowest reads before the batch end, left the updates that fell after
that seen only across the gap (edges and spread of 1-5 % in a 1 s window). Under the GIL the
reader only runs while the feeder waits in a sync, or between its launches; a tick's bounds
are taken around the read itself, so a late thread only widens them. This replaced a feeder
that kept eight ~5 ms chunks queued and polled an event after each: with vLLM's Machete kernel
the GPU stopped taking work inside it 7 times of 7 (profiles/h200/machete/), while an
independent harness that queued ~50 ms of replays and synchronized before queuing more
finished 12 windows of 12.

The loop takes its device, counter reader and clock as arguments, so it runs on fakes in tests
(tests/energy_fakes.py: a simulated GPU, counter, clock and reader thread).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from dqprof.errors import DqprofError
from dqprof.measure.nvml import Nvml
from dqprof.measure.timing import Replay
from dqprof.measure.window import Batch, Estimate, StopRule, Tick, estimate, period_bounds

FEED_METHOD = "batch-sync"
READ_METHOD = "thread"  # the counter is read on its own thread, continuously
BATCH_S = 0.05  # device time per batch: what the independent Machete harness ran cleanly
BRIDGE_S = 0.01  # its first part, queued before the host weighs the last batch's ticks
POLL_S = 2.5e-4  # the reader's sleep between counter reads
HISTORY_TICKS = 4096  # updates a reader keeps (~7 minutes at the H200's 100 ms)
# the period is bounded on this much history: long enough to pin it to microseconds, short
# enough that a clock drifting by some ppm still fits one period within the jitter
PERIOD_HISTORY_S = 10.0
LEAD_S = 0.3  # updates seen this long before a window's first batch help place its grid
# The timing samples just before keep the GPU busy on these very replays for >= 30 ms, so the
# 0.1 s ramp the window once waited repeated a warm-up already done; the window only needs the
# opening tick to lie wholly inside its own busy time, a little after the first launch
GUARD_S = 0.02
NO_TICK_S = 2.0  # no counter update for this long: the counter has stopped
MAX_IDLE_FRAC = 0.02  # a window whose GPU idled longer than this is flagged
# The chunked feeder's call-count resolution (records without ``feed``: calls counted to about
# one 5 ms chunk at each end). gate/compare.py's ENERGY_EDGE_S mirrors it for those records;
# for this feeder's records the gate takes their own edge term (precision_parts.edges)
CHUNK_S = 5e-3


@dataclass
class EnergyStats:
    j_per_call: float | None
    j_per_call_above_idle: float | None
    power_w: float | None
    idle_power_w: float | None
    window_s: float
    ticks: int  # counter update intervals inside the window
    calls: int  # calls completed inside the window
    s_per_call_in_window: float | None  # window over calls: cross-checks the timed median
    flag: str | None  # None, or why the figure is doubtful
    gpu_idle_frac: float | None = None  # device idle between the window's batches / their span
    # how the window was fed and why it stopped (absent from records of the chunked feeder)
    feed: str | None = None
    batch_s: float | None = None  # device seconds per batch, as measured
    batch_replays: int | None = None
    batches: int | None = None  # batches the window touched
    precision: float | None = None  # relative, one standard deviation, as reached
    precision_target: float | None = None
    precision_parts: dict[str, float] | None = None  # spread, edges, counter
    stop: str | None = None  # precise | max | counter stopped | no window
    window_min_s: float | None = None
    window_max_s: float | None = None
    intervals: list[list[float]] = field(default_factory=list)  # [s, J, calls] per update
    counter_read_s: float | None = None  # the slowest counter read seen
    reader: str | None = None  # how the counter was read (READ_METHOD)
    tick_fit: bool | None = None  # the window was placed on the counter's period (window.py)
    period_s: list[float] | None = None  # bounds on that period from the reader's history
    # every update the reader saw: [lo, hi] host seconds from the first batch's start, and mJ
    # from the first update's value, so a later analysis can refit (window.estimate)
    tick_log: list[list[float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class Device(Protocol):
    """What the feeder drives: CUDA graph replays, or fakes in tests."""

    asynchronous: bool  # False: launch() returns when the work is done (nothing to wait for)

    def launch(self, replays: int) -> None: ...
    def mark(self) -> Any: ...  # a device timestamp queued behind the work so far
    def sync(self) -> None: ...  # block until everything queued has run
    def elapsed_s(self, begin: Any, end: Any) -> float: ...  # between two completed marks


class CudaDevice:
    asynchronous = True

    def __init__(self, replay: Replay) -> None:
        self.replay = replay

    def launch(self, replays: int) -> None:
        for _ in range(replays):
            self.replay()

    def mark(self) -> Any:
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        import torch

        torch.cuda.synchronize()

    def elapsed_s(self, begin: Any, end: Any) -> float:
        return begin.elapsed_time(end) / 1e3


class HostDevice(CudaDevice):
    """Eager CPU replays: each launch runs to completion, marks are host times."""

    asynchronous = False

    def mark(self) -> Any:
        return time.perf_counter()

    def sync(self) -> None:
        pass

    def elapsed_s(self, begin: Any, end: Any) -> float:
        return end - begin


class TickHistory:
    """The counter's updates a reader has seen, and its period as they bound it."""

    def __init__(self) -> None:
        self.read_max_s = 0.0  # the slowest read so far
        self.last_change = 0.0  # host time of the latest update seen (or of the start)
        self._ticks: deque[Tick] = deque(maxlen=HISTORY_TICKS)
        self._period: tuple[int, Tick | None, tuple[float, float] | None] = (0, None, None)
        self._fit_from = -math.inf  # host time of the oldest update the period still fits

    def add(self, tick: Tick) -> None:
        self._ticks.append(tick)
        self.last_change = tick.hi

    def ticks(self, since: float = -math.inf) -> list[Tick]:
        """The updates seen whose read ended at or after host time ``since``, in order."""
        return [k for k in list(self._ticks) if k.hi >= since]

    def period(self) -> tuple[float, float] | None:
        """Bounds on the counter's period from the longest run of the latest updates, within
        ``PERIOD_HISTORY_S``, that fits one period; None while too few fit.

        On the H200 (profiles/h200/session7) the 10 s fitted no period in 290 of 774 windows,
        while each window's own updates fitted in 753: as if a rare update were seen off the
        grid (a read whose value lagged the counter, say) and spoiled all 10 s. So the history
        starts after the latest update that breaks the fit (found by bisection, the fit being
        monotone in the updates it must hold), and stays there until it ages out."""
        ticks = list(self._ticks)
        if not ticks:
            return None
        recent = [k for k in ticks if k.hi >= max(ticks[-1].hi - PERIOD_HISTORY_S,
                                                  self._fit_from)]
        if self._period[:2] == (len(recent), recent[-1]):
            return self._period[2]
        bounds = period_bounds(recent)
        if bounds is None and len(recent) > 3:
            lo, hi = 0, len(recent) - 3  # the start index of the longest fitting suffix
            while lo < hi:
                mid = (lo + hi) // 2
                if period_bounds(recent[mid:]) is not None:
                    hi = mid
                else:
                    lo = mid + 1
            bounds = period_bounds(recent[lo:])
            self._fit_from = recent[lo].hi
            recent = recent[lo:]
        self._period = (len(recent), recent[-1], bounds)
        return bounds


class TickReader(TickHistory):
    """Reads the counter back to back on a daemon thread; each change becomes a ``Tick``
    bounded by the start of the read before it and the end of its own read. One runs for a
    whole sweep, so its history bounds the counter's period for every window."""

    def __init__(self, read_mj: Callable[[], int], clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep, poll_s: float = POLL_S) -> None:
        super().__init__()
        self.read_mj, self.clock, self.sleep, self.poll_s = read_mj, clock, sleep, poll_s
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TickReader:
        self.last_change = self.clock()
        self._thread = threading.Thread(target=self._run, name="dqprof-energy-reader",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            prev_lo = self.clock()
            last = self.read_mj()
            self.read_max_s = self.clock() - prev_lo
            while not self._stop.is_set():
                lo = self.clock()
                value = self.read_mj()
                hi = self.clock()
                self.read_max_s = max(self.read_max_s, hi - lo)
                if value != last:
                    self.add(Tick(prev_lo, hi, value))
                    last = value
                prev_lo = lo
                self.sleep(self.poll_s)
        except BaseException as e:  # noqa: BLE001 - handed to the feeder, which raises it
            self._error = e

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def ticks(self, since: float = -math.inf) -> list[Tick]:
        if self._error is not None:
            raise DqprofError(f"reading the energy counter failed: {self._error}")
        return super().ticks(since)


@dataclass
class Trace:
    """Everything one window saw, for the estimate and for tests."""

    ticks: list[Tick] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)
    first: int | None = None  # the opening tick
    last: int | None = None  # the closing tick
    stop: str | None = None
    result: Estimate | None = None
    read_max_s: float = 0.0
    period: tuple[float, float] | None = None  # the counter's period as the reader bounded it


def run_window(device: Device, reader: TickHistory, clock: Callable[[], float],
               replays_per_batch: int, calls_per_replay: int, rule: StopRule) -> Trace:
    """Feed the device batch by batch until the rule closes a tick-aligned window.

    After each sync the next batch's first ~10 ms (its bridge) is queued, so the GPU has work
    while the host reads the synced batch's span and weighs the ticks seen so far; then the
    rest of the batch. The window ends on the first tick that meets the rule, all of whose
    batches are synced by then; only the bridge queued after it is waited for, outside the
    window (a whole 50 ms batch there cost as much again per point).
    """
    tr = Trace()
    marks: list[tuple[Any, Any]] = []
    bridge = max(1, round(replays_per_batch * BRIDGE_S / BATCH_S))
    rest = max(0, replays_per_batch - bridge)

    def settle(q: list) -> None:
        """Read a synced batch's device span, the device idle before it and inside it."""
        batch, begin, end, inner = q
        batch.device_s = device.elapsed_s(begin, end)
        if marks:
            batch.gap_before_s = max(0.0, device.elapsed_s(marks[-1][1], begin))
        if inner is not None:
            batch.gap_inside_s = max(0.0, device.elapsed_s(*inner))
        marks.append((begin, end))

    def queue() -> list:
        """A batch's first ``bridge`` replays: the GPU's work while the host weighs."""
        batch = Batch(clock(), bridge * calls_per_replay)
        tr.batches.append(batch)
        begin = device.mark()
        device.launch(bridge)
        return [batch, begin, device.mark(), None]

    def extend(q: list) -> None:
        """The rest of the batch, behind its bridge (two marks: idle between them is seen)."""
        if rest:
            resume = device.mark()
            device.launch(rest)
            q[0].calls += rest * calls_per_replay
            q[2], q[3] = device.mark(), (q[2], resume)

    def weigh(i: int, synced_until: float) -> int:
        """Open on the first tick inside busy time, close on the first that meets the rule;
        ticks whose batch is not synced yet wait. Returns the next tick to weigh."""
        while i < len(tr.ticks) and tr.ticks[i].hi <= synced_until:
            if tr.first is None:
                if tr.ticks[i].lo >= tr.batches[0].start + GUARD_S:
                    tr.first = i
            else:
                done = [b for b in tr.batches if b.device_s is not None]
                est = estimate(tr.ticks, done, tr.first, i, reader.period())
                if stop := rule.decide(est.intervals, est.seconds, est.decisive):
                    tr.stop, tr.last, tr.result = stop, i, est
                    break
            i += 1
        return i

    since = clock() - LEAD_S
    give_up = clock() + rule.max_s + 2 * NO_TICK_S  # a window that never opened or closed
    weighed = 0
    running = queue()
    extend(running)
    while True:
        device.sync()
        running[0].end = clock()
        synced = running
        if tr.stop is not None:  # the bridge queued after the window's last tick: outside it
            settle(synced)
            break
        running = queue()  # the GPU has work again: now the bookkeeping
        settle(synced)
        tr.ticks = reader.ticks(since)
        weighed = weigh(weighed, synced[0].end)
        if tr.stop is None and clock() - reader.last_change > NO_TICK_S:
            tr.stop = "counter stopped"
        elif tr.stop is None and clock() > give_up:
            tr.stop = "no window"
        if tr.stop is None:
            extend(running)
    tr.read_max_s, tr.period = reader.read_max_s, reader.period()
    return tr


def _wait_tick(nvml: Nvml, last: int, feed: Callable[[], None]) -> tuple[int, float]:
    while True:
        feed()
        now = nvml.energy_mj()
        if now != last:
            return now, time.perf_counter()


def measure_idle(nvml: Nvml, seconds: float = 2.0, settle_s: float = 1.0) -> float:
    """Board power with nothing running, over a tick-aligned window (W)."""
    import torch

    torch.cuda.synchronize()
    time.sleep(settle_s)
    e0, t0 = _wait_tick(nvml, nvml.energy_mj(), lambda: time.sleep(1e-3))
    while time.perf_counter() - t0 < seconds:
        time.sleep(0.01)
    e1, t1 = _wait_tick(nvml, nvml.energy_mj(), lambda: time.sleep(1e-3))
    return (e1 - e0) / 1e3 / (t1 - t0)


def measure_energy(replay: Replay, nvml: Nvml, per_call_s: float, window_s: float,
                   idle_power_w: float | None, power_limit_w: float | None, *,
                   window_min_s: float = 0.3, precision: float = 0.005,
                   device: Device | None = None, reader: TickHistory | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> EnergyStats:
    """One window on ``replay``: J/call to ``precision``, ``window_min_s``..``window_s`` long.

    ``per_call_s`` sizes the batches (the slower of the event-timed call and the host's view
    of a pass, so that timings that miss work cannot queue hours of it).
    """
    replays = max(1, round(BATCH_S / max(per_call_s * replay.calls, 1e-9)))
    dev = device or (CudaDevice(replay) if replay.device == "cuda" else HostDevice(replay))
    rule = StopRule(precision, window_min_s, window_s)
    own = TickReader(nvml.energy_mj, clock).start() if reader is None else None
    try:
        tr = run_window(dev, reader or own, clock, replays, replay.calls, rule)
    finally:
        if own is not None:
            own.stop()
    return energy_stats(tr, rule, replays, idle_power_w, power_limit_w)


def energy_stats(tr: Trace, rule: StopRule, replays: int, idle_power_w: float | None,
                 power_limit_w: float | None) -> EnergyStats:
    est = tr.result
    spans = [b.device_s for b in tr.batches if b.device_s]
    method = {"feed": FEED_METHOD, "batch_s": sorted(spans)[len(spans) // 2] if spans else None,
              "batch_replays": replays, "precision_target": rule.target, "stop": tr.stop,
              "window_min_s": rule.min_s, "window_max_s": rule.max_s,
              "counter_read_s": tr.read_max_s, "reader": READ_METHOD,
              "period_s": [round(v, 9) for v in tr.period] if tr.period else None,
              "tick_log": tick_log(tr)}
    if est is None or tr.first is None or tr.last is None:
        return EnergyStats(None, None, None, idle_power_w, 0.0, 0, 0, None,
                           f"no tick-aligned window ({tr.stop})", None, **method)
    joules, dt, calls = est.joules, est.seconds, est.calls
    t0, t1 = tr.ticks[tr.first].t, tr.ticks[tr.last].t
    inside = [b for b in tr.batches if b.runs()[1] > t0 and b.runs()[0] < t1]
    idle_frac = idle_fraction(inside)
    power = joules / dt if dt > 0 else None
    flag = None
    if joules <= 0 or calls <= 0:
        flag = "zero"
    elif power_limit_w and power and power > 1.3 * power_limit_w:
        flag = "implausible: power above 1.3x the limit"
    elif idle_power_w and power and power < 0.8 * idle_power_w:
        flag = "implausible: power below idle"
    elif est.intervals < rule.min_intervals:
        flag = f"few counter ticks ({est.intervals})"
    elif idle_frac is not None and idle_frac > MAX_IDLE_FRAC:
        flag = f"gpu idle {idle_frac:.1%} of the window (host could not keep it fed)"
    per_call = joules / calls if calls > 0 else None
    above = ((joules - idle_power_w * dt) / calls if calls > 0 and idle_power_w is not None
             else None)
    reached = est.precision if math.isfinite(est.precision) else None
    parts = {k: getattr(est, k) for k in ("spread", "edges", "counter")}
    return EnergyStats(
        per_call, above, power, idle_power_w, dt, est.intervals, round(calls),
        dt / calls if calls > 0 else None, flag, idle_frac,
        batches=len(inside), precision=reached,
        precision_parts={k: v if math.isfinite(v) else None for k, v in parts.items()},
        intervals=[[round(s, 6), round(j, 4), round(c, 1)] for s, j, c in est.interval_rows],
        tick_fit=est.fitted, **method)


def tick_log(tr: Trace) -> list[list[float]]:
    if not tr.ticks or not tr.batches:
        return []
    t0, mj0 = tr.batches[0].start, tr.ticks[0].mj
    return [[round(k.lo - t0, 6), round(k.hi - t0, 6), k.mj - mj0] for k in tr.ticks]


def idle_fraction(batches: list[Batch]) -> float | None:
    """Device time between consecutive batches over their whole device span.

    Measured by the batches' edge events (device clock, read after each sync): the gap from
    one batch's end mark to the next one's begin mark, or from a bridge's end to the rest of
    its batch, is time the GPU had none of our work,
    which host clocks cannot see (a sync returns some microseconds after the GPU finished).
    Not seen: the first graph's pickup after a begin mark, microseconds per 50 ms batch.
    """
    if len(batches) < 2 or any(b.device_s is None for b in batches):
        return None
    gaps = sum(b.gap_before_s or 0.0 for b in batches[1:])
    span = sum(b.device_s or 0.0 for b in batches) + gaps  # device_s holds inside gaps
    gaps += sum(b.gap_inside_s for b in batches)
    return gaps / span if span > 0 else None
