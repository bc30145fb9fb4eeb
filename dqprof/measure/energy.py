"""Energy per call from the NVML total-energy counter, over windows aligned to its ticks.

The counter (millijoules) only moves when the driver updates it (about every 100 ms on an
H200), so a window read at arbitrary times is off by up to one update at each end. Here the
GPU is kept busy with the point's replays, the window opens on the first counter update after
a warm-up and closes on the first update after ``window_s``: its energy and duration are then
exact to the counter's own resolution. Calls executed inside the window are counted with
events recorded after every small chunk of replays (about 5 ms each), so the count is exact to
one chunk; energy per call is window energy over that count.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from dqprof.measure.nvml import Nvml
from dqprof.measure.timing import Replay

CHUNK_S = 5e-3  # device time per chunk of replays (the resolution of the call count)
LEAD_CHUNKS = 8  # chunks queued ahead of the GPU, so it never idles while we poll
RAMP_S = 0.1  # busy time before the window opens, after the timing samples (clocks settle)
MAX_IDLE_FRAC = 0.02  # a window whose GPU idled longer than this is flagged


@dataclass
class EnergyStats:
    j_per_call: float | None
    j_per_call_above_idle: float | None
    power_w: float | None
    idle_power_w: float | None
    window_s: float
    ticks: int  # counter updates seen inside the window
    calls: int  # calls completed inside the window
    s_per_call_in_window: float | None  # window over calls: cross-checks the timed median
    flag: str | None  # None, or why the figure is doubtful
    gpu_idle_frac: float | None = None  # device time between the window's chunks / its span

    def as_dict(self) -> dict:
        return asdict(self)


def _wait_tick(nvml: Nvml, last: int, feed: callable) -> tuple[int, float]:  # type: ignore[valid-type]
    while True:
        feed()
        now = nvml.energy_mj()
        if now != last:
            return now, time.perf_counter()


def measure_idle(nvml: Nvml, seconds: float = 2.0, settle_s: float = 1.0) -> float:
    """Board power with nothing running, over a tick-aligned window (W)."""
    torch.cuda.synchronize()
    time.sleep(settle_s)
    e0, t0 = _wait_tick(nvml, nvml.energy_mj(), lambda: time.sleep(1e-3))
    while time.perf_counter() - t0 < seconds:
        time.sleep(0.01)
    e1, t1 = _wait_tick(nvml, nvml.energy_mj(), lambda: time.sleep(1e-3))
    return (e1 - e0) / 1e3 / (t1 - t0)


def measure_energy(replay: Replay, nvml: Nvml, per_call_s: float, window_s: float,
                   idle_power_w: float | None, power_limit_w: float | None) -> EnergyStats:
    replay_s = max(per_call_s * replay.calls, 1e-7)
    chunk = max(1, round(CHUNK_S / replay_s))
    # (start, end) timing events around each chunk: the ends count completed calls, and the
    # gaps between one chunk's end and the next one's start show whether the GPU ever idled
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    done = 0  # chunks known complete

    def completed() -> int:
        nonlocal done
        while done < len(events) and events[done][1].query():
            done += 1
        return done

    def feed() -> None:
        # top the queue up, not one chunk per poll: a slow NVML read must not starve the GPU
        while len(events) - completed() < LEAD_CHUNKS:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(chunk):
                replay()
            end.record()
            events.append((begin, end))

    start = time.perf_counter()
    while time.perf_counter() - start < RAMP_S:
        feed()
    e0, t0 = _wait_tick(nvml, nvml.energy_mj(), feed)
    c0 = completed()
    ticks, last = 0, e0
    while time.perf_counter() - t0 < window_s:
        feed()
        now = nvml.energy_mj()
        if now != last:
            ticks, last = ticks + 1, now
    e1, t1 = _wait_tick(nvml, last, feed)
    c1 = completed()
    torch.cuda.synchronize()
    ticks += 1

    joules, dt = (e1 - e0) / 1e3, t1 - t0
    calls = (c1 - c0) * chunk * replay.calls
    idle_frac = _idle_fraction(events[c0:c1])
    power = joules / dt if dt > 0 else None
    flag = None
    if joules <= 0 or calls == 0:
        flag = "zero"
    elif power_limit_w and power and power > 1.3 * power_limit_w:
        flag = "implausible: power above 1.3x the limit"
    elif idle_power_w and power and power < 0.8 * idle_power_w:
        flag = "implausible: power below idle"
    elif ticks < 5:
        flag = f"few counter ticks ({ticks})"
    elif idle_frac is not None and idle_frac > MAX_IDLE_FRAC:
        flag = f"gpu idle {idle_frac:.1%} of the window (host could not keep it fed)"
    per_call = joules / calls if calls else None
    above = (joules - idle_power_w * dt) / calls if calls and idle_power_w is not None else None
    return EnergyStats(per_call, above, power, idle_power_w, dt, ticks, calls,
                       dt / calls if calls else None, flag, idle_frac)


def _idle_fraction(chunks: list[tuple[torch.cuda.Event, torch.cuda.Event]]) -> float | None:
    """Share of the chunks' device span not spent inside a chunk (launch gaps)."""
    if len(chunks) < 2:
        return None
    span = chunks[0][0].elapsed_time(chunks[-1][1])
    busy = sum(b.elapsed_time(e) for b, e in chunks)
    return max(0.0, 1 - busy / span) if span > 0 else None
