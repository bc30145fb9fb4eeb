"""Energy windows around blocking generate() calls, on the NVML counter's own ticks.

The counter (``Nvml.energy_mj``, dqprof.measure.nvml) moves about every 100 ms. A window opens
on a tick with the GPU idle, runs whole calls, and closes on the first tick after the last
call returns; its energy is then exact to the counter. The two short gaps between the ticks
and the calls (GPU idle, at most one tick period each) are charged at the idle power measured
in the same process and taken out. A thread polls the counter meanwhile, because generate()
blocks the caller: it counts the ticks inside the window.

Clock, sleep and counter are injected so the logic runs on CPU in tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from dqprof.fullmodel.workload import Window, WindowRule

POLL_S = 0.002


class TickMeter:
    def __init__(self, read_mj: Callable[[], int], clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep, poll_s: float = POLL_S):
        self.read_mj, self.clock, self.sleep, self.poll_s = read_mj, clock, sleep, poll_s
        self._ticks: list[float] = []  # times at which the sampler saw the counter change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        def run() -> None:
            last = self.read_mj()
            while not self._stop.is_set():
                now = self.read_mj()
                if now != last:
                    self._ticks.append(self.clock())
                    last = now
                self.sleep(self.poll_s)

        self._thread = threading.Thread(target=run, name="dqprof-energy-ticks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def ticks_between(self, t0: float, t1: float) -> int:
        return sum(1 for t in list(self._ticks) if t0 < t <= t1)

    def wait_tick(self) -> tuple[int, float]:
        """Block until the counter changes; (its new value in mJ, the time seen)."""
        last = self.read_mj()
        while True:
            now = self.read_mj()
            if now != last:
                return now, self.clock()
            self.sleep(self.poll_s / 2)

    def idle_power(self, seconds: float = 2.0) -> float:
        """Board power with nothing running, over a tick-aligned window (W)."""
        e0, t0 = self.wait_tick()
        while self.clock() - t0 < seconds:
            self.sleep(0.01)
        e1, t1 = self.wait_tick()
        return (e1 - e0) / 1e3 / (t1 - t0)


def measure_window(call: Callable[[int], tuple[int, int]], rule: WindowRule,
                   meter: TickMeter | None, idle_w: float | None,
                   clock: Callable[[], float] = time.perf_counter) -> Window:
    """Run ``call(i)`` (-> tokens in, tokens out) until ``rule`` is met; time and energy."""
    e0 = t0 = None
    if meter is not None:
        e0, t0 = meter.wait_tick()
    start = clock()
    calls = tokens_in = tokens_out = 0
    while True:
        tin, tout = call(calls)
        calls, tokens_in, tokens_out = calls + 1, tokens_in + tin, tokens_out + tout
        now = clock()
        ticks = meter.ticks_between(t0, now) if meter is not None else None
        if rule.done(now - start, ticks, calls):
            break
    end = clock()
    if meter is None:
        return Window(calls, end - start, tokens_in, tokens_out)
    e1, t1 = meter.wait_tick()
    raw = (e1 - e0) / 1e3
    gap = (start - t0) + (t1 - end)
    energy = raw - idle_w * gap if idle_w is not None else raw
    return Window(calls, end - start, tokens_in, tokens_out, energy, raw, t1 - t0, gap,
                  meter.ticks_between(t0, t1))
