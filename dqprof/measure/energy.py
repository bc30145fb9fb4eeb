"""Energy per call from the NVML total-energy counter, over windows aligned to its ticks.

The counter (millijoules) only moves when the driver updates it (about every 100 ms on an
H200), so a window read at arbitrary times is off by up to one update at each end. Here the
window opens on a counter update while the GPU runs the point's replays and closes on a later
one, so its energy and duration are exact to the counter; it closes on the first update where
the energy per call is known to the target precision (``window.py``), within a minimum and a
maximum length.

The feeder ("batch-sync"): replays are queued in batches of about ``BATCH_S`` of device time
and each batch is waited for with one blocking ``synchronize``; nothing else is ever waited on
or polled on the device. While a batch runs the host reads the counter (every ``POLL_S``) and
stops reading shortly before the batch should end. Calls are exact at batch boundaries; two
timing events per batch, at its edges and read only after its sync, give each batch's device
span and the device idle time between batches. This replaced a feeder that kept eight ~5 ms
chunks queued and polled an event after each: with vLLM's Machete kernel the GPU stopped
taking work inside it 7 times of 7 (profiles/h200/machete/), while an independent harness that
queued ~50 ms of replays and synchronized before queuing more finished 12 windows of 12.

The loop takes its device, counter, clock and sleep as arguments, so it runs on fakes in tests.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from dqprof.measure.nvml import Nvml
from dqprof.measure.timing import Replay
from dqprof.measure.window import Batch, Estimate, StopRule, Tick, estimate

FEED_METHOD = "batch-sync"
BATCH_S = 0.05  # device time per batch: what the independent Machete harness ran cleanly
POLL_S = 2.5e-4  # host sleep between counter reads while a batch runs
SYNC_AHEAD = 0.95  # stop reading and block at this share of the previous batch's device span
READ_MARGIN = 3  # ... or this many of the slowest recent counter reads before its end
LAUNCH_GROUP = 64  # replays queued between two counter reads while a batch is being queued
# The timing samples just before keep the GPU busy on these very replays for >= 30 ms, so the
# 0.1 s ramp the window once waited repeated a warm-up already done; the window only needs the
# opening tick to lie wholly inside its own busy time, a little after the first launch
GUARD_S = 0.02
# an opening tick seen across a longer gap than this or twice the usual one between counter
# reads (it met a blocking sync) is passed over: its host time is too loose
OPEN_MAX_JITTER_S = 1e-3
NO_TICK_S = 2.0  # no counter update for this long: the counter has stopped
MAX_IDLE_FRAC = 0.02  # a window whose GPU idled longer than this is flagged
# The chunked feeder's call-count resolution (records without ``feed``: calls counted to about
# one 5 ms chunk at each end). gate/compare.py's ENERGY_EDGE_S mirrors it for every record; records
# of this feeder carry their own edge term (precision_parts.edges)
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
    counter_read_s: float | None = None  # the slowest counter read seen (sets the deadline)

    def as_dict(self) -> dict:
        return asdict(self)


class Device(Protocol):
    """What the feeder drives: CUDA graph replays, or fakes in tests."""

    asynchronous: bool  # False: launch() returns when the work is done (nothing to wait for)
    launch_group: int  # replays queued between two counter reads

    def launch(self, replays: int) -> None: ...
    def mark(self) -> Any: ...  # a device timestamp queued behind the work so far
    def sync(self) -> None: ...  # block until everything queued has run
    def elapsed_s(self, begin: Any, end: Any) -> float: ...  # between two completed marks


class CudaDevice:
    asynchronous = True
    launch_group = LAUNCH_GROUP

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
    launch_group = 1  # each replay runs while it is launched: read the counter after each

    def mark(self) -> Any:
        return time.perf_counter()

    def sync(self) -> None:
        pass

    def elapsed_s(self, begin: Any, end: Any) -> float:
        return end - begin


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


def run_window(device: Device, read_mj: Callable[[], int], clock: Callable[[], float],
               sleep: Callable[[float], None], replays_per_batch: int, calls_per_replay: int,
               expect_batch_s: float, rule: StopRule) -> Trace:
    """Feed the device batch by batch until the rule closes a tick-aligned window."""
    tr = Trace()
    marks: list[tuple[Any, Any]] = []
    prev_lo = clock()
    last_mj = read_mj()
    last_change = clock()
    candidate: int | None = None  # a tick the rule would close on, checked after the sync
    gaps: deque[float] = deque(maxlen=64)  # recent spans from one read's start to the next's end
    reads: deque[float] = deque([0.0], maxlen=64)  # recent durations of one counter read

    def poll() -> None:
        nonlocal prev_lo, last_mj, last_change
        lo = clock()
        value = read_mj()
        hi = clock()
        gaps.append(hi - prev_lo)
        reads.append(hi - lo)
        if value != last_mj:
            tr.ticks.append(Tick(prev_lo, hi, value))
            last_mj, last_change = value, hi
            on_tick()
        prev_lo = lo

    def on_tick() -> None:
        nonlocal candidate
        tick, i = tr.ticks[-1], len(tr.ticks) - 1
        if tr.first is None:
            busy_since = tr.batches[0].start if tr.batches else math.inf
            loose = max(OPEN_MAX_JITTER_S, 2 * statistics.median(gaps))
            if tick.lo >= busy_since + GUARD_S and tick.hi - tick.lo <= loose:
                tr.first = i
            return
        if candidate is None and _decide(tr, provisional(), i, rule):
            candidate = i

    def provisional() -> list[Batch]:
        """The batches with the running one given the previous one's span, for a guess."""
        done = [b for b in tr.batches if b.end is not None]
        if len(done) == len(tr.batches) or not done:
            return tr.batches
        ref, cur = done[-1], tr.batches[-1]
        span = ref.device_s or expect_batch_s
        return [*done, Batch(cur.start, cur.calls, cur.start + ref.slack + span, span)]

    def settle(batch: Batch, begin: Any, end: Any) -> None:
        """Read a synced batch's device span and the device idle before it."""
        batch.device_s = device.elapsed_s(begin, end)
        if marks:
            batch.gap_before_s = max(0.0, device.elapsed_s(marks[-1][1], begin))
        marks.append((begin, end))

    calls = replays_per_batch * calls_per_replay
    give_up = clock() + rule.max_s + 2 * NO_TICK_S  # a window that never opened or closed
    pending: tuple[Batch, Any, Any] | None = None  # synced, its spans not read yet
    while tr.stop is None:
        start = clock()
        batch = Batch(start, calls)
        tr.batches.append(batch)
        begin = device.mark()
        for queued in range(0, replays_per_batch, device.launch_group):
            device.launch(min(device.launch_group, replays_per_batch - queued))
            if pending:  # the GPU has work again: now the bookkeeping of the last batch
                settle(*pending)
                expect_batch_s = pending[0].device_s or expect_batch_s
                pending = None
            poll()
        end = device.mark()
        # stop reading early enough that a read in progress cannot overrun the batch's end: a
        # read of the counter can take milliseconds, and a GPU whose batch ended meanwhile
        # idles until the sync (on the H200 a fixed 95 % deadline left a median 5 % idle;
        # this one 0.4 %)
        deadline = start + min(SYNC_AHEAD * expect_batch_s,
                               expect_batch_s - READ_MARGIN * max(reads))
        while device.asynchronous and candidate is None and clock() < deadline:
            sleep(POLL_S)
            poll()
        device.sync()
        batch.end = clock()
        if candidate is None:
            pending = (batch, begin, end)
        else:  # confirm on exact batch spans before queuing more, or go on
            settle(batch, begin, end)
            for i in range(candidate, len(tr.ticks)):
                if stop := _decide(tr, tr.batches, i, rule):
                    tr.stop, tr.last = stop, i
                    break
            candidate = None
        if tr.stop is None and clock() - last_change > NO_TICK_S:
            tr.stop = "counter stopped"
        elif tr.stop is None and clock() > give_up:
            tr.stop = "no window"
    if pending:
        settle(*pending)
    tr.read_max_s = max(reads)
    if tr.first is not None and tr.last is not None:
        tr.result = estimate(tr.ticks, tr.batches, tr.first, tr.last)
    return tr


def _decide(tr: Trace, batches: list[Batch], i: int, rule: StopRule) -> str | None:
    if tr.first is None or i <= tr.first:
        return None
    est = estimate(tr.ticks, batches, tr.first, i)
    return rule.decide(est.intervals, est.seconds, est.precision)


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
                   device_call_s: float | None = None, window_min_s: float = 0.4,
                   precision: float = 0.005, device: Device | None = None,
                   clock: Callable[[], float] = time.perf_counter,
                   sleep: Callable[[float], None] = time.sleep) -> EnergyStats:
    """One window on ``replay``: J/call to ``precision``, ``window_min_s``..``window_s`` long.

    ``per_call_s`` sizes the batches (the slower of the event-timed call and the host's view
    of a pass, so that timings that miss work cannot queue hours of it); ``device_call_s``
    (the event-timed call) sets when the host first stops reading and syncs: too early only
    makes it block longer, too late would leave the GPU idle.
    """
    replays = max(1, round(BATCH_S / max(per_call_s * replay.calls, 1e-9)))
    expect = replays * replay.calls * (device_call_s or per_call_s)
    dev = device or (CudaDevice(replay) if replay.device == "cuda" else HostDevice(replay))
    rule = StopRule(precision, window_min_s, window_s)
    tr = run_window(dev, nvml.energy_mj, clock, sleep, replays, replay.calls, expect, rule)
    return energy_stats(tr, rule, replays, idle_power_w, power_limit_w)


def energy_stats(tr: Trace, rule: StopRule, replays: int, idle_power_w: float | None,
                 power_limit_w: float | None) -> EnergyStats:
    est = tr.result
    spans = [b.device_s for b in tr.batches if b.device_s]
    method = {"feed": FEED_METHOD, "batch_s": sorted(spans)[len(spans) // 2] if spans else None,
              "batch_replays": replays, "precision_target": rule.target, "stop": tr.stop,
              "window_min_s": rule.min_s, "window_max_s": rule.max_s,
              "counter_read_s": tr.read_max_s}
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
        **method)


def idle_fraction(batches: list[Batch]) -> float | None:
    """Device time between consecutive batches over their whole device span.

    Measured by the batches' edge events (device clock, read after each sync): the gap from
    one batch's end mark to the next one's begin mark is time the GPU had none of our work,
    which host clocks cannot see (a sync returns some microseconds after the GPU finished).
    Not seen: the first graph's pickup after a begin mark, microseconds per 50 ms batch.
    """
    if len(batches) < 2 or any(b.device_s is None for b in batches):
        return None
    gaps = sum(b.gap_before_s or 0.0 for b in batches[1:])
    span = sum(b.device_s or 0.0 for b in batches) + gaps
    return gaps / span if span > 0 else None
