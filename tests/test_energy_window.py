"""The energy window on CPU: its stopping rule, its precision, and the batch-sync feeder
driven by a simulated GPU, counter and clock (tests/energy_fakes.py)."""

from __future__ import annotations

import math
import random
import statistics
import time
from pathlib import Path

import pytest
import torch
from energy_fakes import SimClock, SimCounter, SimGpu, SimReader, rig

import dqprof.measure.energy as en
from dqprof.errors import DqprofError
from dqprof.kernels import backend_names, create
from dqprof.measure.energy import BATCH_S, energy_stats, measure_energy, run_window
from dqprof.measure.window import (
    Batch,
    StopRule,
    Tick,
    calls_at,
    estimate,
    period_bounds,
    sd_factor,
)
from dqprof.models.shapes import LinearShape
from dqprof.results import load_records
from dqprof.sweep import Sweep, SweepConfig, _Weights, load_suite, plan

TINY = str(Path(__file__).parent / "data" / "tiny-llama.json")
CALLS_PER_REPLAY = 10
IDLE_W = 100.0


def window(seed: int = 0, rule: StopRule | None = None, gpu: dict | None = None,
           history_s: float = 0.0, **counter: float):
    """One window on the simulated rig: (stats, trace, gpu, counter); its reader started
    ``history_s`` before the window."""
    clock, sim, ctr = rig(seed, **counter)
    for key, value in (gpu or {}).items():
        setattr(sim, key, value)
    rule = rule or StopRule()
    replays = max(1, round(BATCH_S / sim.replay_s))
    reader = SimReader(clock, ctr).start()
    clock.t += history_s  # the sweep's reader has been reading meanwhile (GPU idle)
    tr = run_window(sim, reader, clock, replays, CALLS_PER_REPLAY, rule)
    return energy_stats(tr, rule, replays, IDLE_W, 700.0), tr, sim, ctr


def rel_err(stats: en.EnergyStats, ctr: SimCounter) -> float:
    return abs(stats.j_per_call / ctr.true_j_per_call(CALLS_PER_REPLAY) - 1)


# -- the rule and the estimate ---------------------------------------------------------------

def test_rule_needs_intervals_length_and_precision_and_stops_at_the_max() -> None:
    rule = StopRule(target=0.005, min_s=0.4, max_s=1.0)
    assert rule.decide(3, 0.5, 0.004) == "precise"
    assert rule.decide(2, 0.5, 0.001) is None  # too few counter updates
    assert rule.decide(6, 0.3, 0.001) is None  # shorter than the minimum
    assert rule.decide(8, 0.8, 0.006) is None  # not precise yet
    assert rule.decide(10, 1.02, 0.02) == "max"
    # a minimum above the maximum is moot: the longest window wins
    assert StopRule(0.005, 2.0, 1.0).decide(10, 1.0, 0.001) == "max"


def test_sd_factor_widens_few_intervals() -> None:
    assert sd_factor(1) > sd_factor(4) > sd_factor(30) > 1
    assert sd_factor(0) == math.inf and sd_factor(100) == pytest.approx(1.075, abs=0.005)
    # the 84 % quantile of chi-square with 4 degrees of freedom is 1.43 (tables)
    assert sd_factor(4) == pytest.approx(math.sqrt(4 / 1.43), rel=0.01)


def _steady(n_ticks: int, j_per_tick: float = 40.0) -> tuple[list[Tick], list[Batch]]:
    """Ticks every 0.1 s seen exactly; 50 ms batches of 1000 calls back to back, no slack."""
    ticks = [Tick(0.05 + 0.1 * i, 0.05 + 0.1 * i, int(1000 * j_per_tick * i))
             for i in range(n_ticks)]
    batches = [Batch(0.05 * i, 1000, 0.05 * (i + 1), 0.05) for i in range(2 * n_ticks + 2)]
    return ticks, batches


def test_estimate_of_a_perfect_trace_is_exact_to_the_counter() -> None:
    ticks, batches = _steady(7)
    est = estimate(ticks, batches, 1, 6)
    assert est.intervals == 5 and est.seconds == pytest.approx(0.5)
    assert est.joules == pytest.approx(200.0) and est.calls == pytest.approx(10000)
    assert est.j_per_call == pytest.approx(0.02)
    # no spread, no jitter, no slack: only the counter's 1 mJ at each end is left
    assert est.spread == pytest.approx(0, abs=1e-12) and est.edges == pytest.approx(0, abs=1e-12)
    assert est.precision == pytest.approx(math.sqrt(2) * 1e-3 / 200)
    assert [r[2] for r in est.interval_rows] == pytest.approx([2000] * 5)


def test_jitter_and_spread_widen_the_precision() -> None:
    ticks, batches = _steady(7)
    jittery = [Tick(k.lo - 1e-3, k.hi + 1e-3, k.mj) for k in ticks]
    est = estimate(jittery, batches, 1, 6)
    # +-1 ms at each end at 20000 calls/s, over 10000 calls: two independent rectangular bounds
    # (all ticks off the grid alike, so the grid fit cannot narrow them)
    assert est.edges == pytest.approx(math.hypot(20.0, 20.0) / math.sqrt(3) / 10000)
    noisy = [Tick(k.lo, k.hi, k.mj + (300 if i % 2 else 0)) for i, k in enumerate(ticks)]
    est = estimate(noisy, batches, 1, 6)
    per_call = [j / c for _, j, c in est.interval_rows]  # 0.75 % up and down
    sd = statistics.stdev(per_call) / statistics.fmean(per_call)
    assert est.spread == pytest.approx(sd_factor(4) * sd / math.sqrt(5))
    assert est.spread > 0.004


def test_a_tick_between_batches_counts_exactly_and_reaches_the_next_batch() -> None:
    batches = [Batch(0.0, 100, 0.01, 0.01), Batch(0.011, 100, 0.021, 0.01)]
    edge = calls_at(0.0105, 0.0, batches, 0.0)
    assert edge.calls == 100 and edge.err == 0
    near = calls_at(0.0105, 0.001, batches, 0.0)  # within 1 ms of the second batch's start
    assert near.calls == 100 and near.err == pytest.approx(5.0)


# -- the feeder on a simulated GPU -----------------------------------------------------------

def test_stable_power_stops_early_and_precise() -> None:
    stats, tr, _, ctr = window(noise=0.005)
    assert stats.stop == "precise" and stats.flag is None
    assert stats.ticks >= 3 and 0.3 <= stats.window_s < 1.0
    assert stats.precision <= stats.precision_target == 0.005
    assert rel_err(stats, ctr) <= 3 * stats.precision
    assert stats.gpu_idle_frac < 0.02
    assert stats.feed == "batch-sync" and stats.batch_s == pytest.approx(BATCH_S, rel=0.05)
    assert len(stats.intervals) == stats.ticks
    assert sum(r[1] for r in stats.intervals) == pytest.approx(stats.j_per_call * stats.calls,
                                                                rel=1e-3)


def test_noisy_power_runs_to_the_maximum_and_says_what_it_reached() -> None:
    stats, _, _, _ = window(noise=0.15)
    assert stats.stop == "max" and stats.window_s >= 1.0
    assert stats.precision > stats.precision_target  # never the target it did not reach
    assert stats.flag is None and stats.ticks >= 10


def test_reported_precision_covers_the_error_over_many_windows() -> None:
    """One standard deviation: about 2/3 of windows within it, nearly all within twice it,
    also at noise levels where some windows stop early on a lucky spread."""
    within, within2, n = 0, 0, 60
    for seed in range(n):
        stats, _, _, ctr = window(seed, noise=0.03)
        assert stats.stop in ("precise", "max")
        if stats.stop == "precise":
            assert stats.precision <= stats.precision_target
        else:
            assert stats.window_s >= 1.0
        err = rel_err(stats, ctr)
        within += err <= stats.precision
        within2 += err <= 2 * stats.precision
    assert within >= 0.6 * n and within2 >= 0.9 * n


def test_a_maximum_below_three_updates_stops_there_and_is_flagged() -> None:
    stats, _, _, _ = window(noise=0.005, rule=StopRule(max_s=0.15))
    assert stats.stop == "max" and stats.ticks < 3
    assert stats.flag == f"few counter ticks ({stats.ticks})"


def test_feeder_queues_one_batch_then_syncs_and_polls_nothing_on_the_device() -> None:
    stats, tr, gpu, ctr = window(noise=0.005)
    replays = stats.batch_replays
    assert replays == round(BATCH_S / gpu.replay_s)
    bridge = round(replays * en.BRIDGE_S / BATCH_S)
    # every batch: its bridge and then the rest, each between two marks, then one sync for
    # exactly that batch; the batch after the window's last tick is its bridge alone
    segments = " ".join(gpu.log).split(" sync after ")
    sizes = [int(seg.split()[0]) for seg in segments[1:]]
    assert len(sizes) == len(tr.batches)
    assert sizes[:-1] == [replays] * (len(sizes) - 1) and sizes[-1] == bridge
    for seg in segments[:-1]:
        body = seg.split(" ", 1)[1] if seg[0].isdigit() else seg
        assert body in (f"mark launch {bridge} mark mark launch {replays - bridge} mark",
                        f"mark launch {bridge} mark"), body
    assert sum(b.calls for b in tr.batches) == (sum(sizes)) * CALLS_PER_REPLAY


def test_calls_in_the_window_are_within_the_stated_edge_bound() -> None:
    for seed in range(10):
        stats, tr, gpu, ctr = window(seed, noise=0.005)
        first, last = tr.ticks[tr.first], tr.ticks[tr.last]
        u0 = next(u for u in ctr._updates if first.lo <= u <= first.hi)
        u1 = next(u for u in ctr._updates if last.lo <= u <= last.hi)
        true_calls = (gpu.calls_done(u1, CALLS_PER_REPLAY)
                      - gpu.calls_done(u0, CALLS_PER_REPLAY))
        # the edge part is two rectangular bounds a, b as one standard uncertainty,
        # hypot(a, b) / sqrt(3); their sum a + b is at most sqrt(6) times that
        bound = stats.precision_parts["edges"] * math.sqrt(6) * stats.calls
        assert abs(stats.calls - true_calls) <= bound + 1


def test_the_window_opens_inside_busy_time() -> None:
    _, tr, _, _ = window(noise=0.005)
    assert tr.ticks[tr.first].lo >= tr.batches[0].start + en.GUARD_S


def test_a_host_slow_to_refeed_the_gpu_is_flagged() -> None:
    stats, _, _, _ = window(noise=0.005, gpu={"wake_s": 2e-3})  # 2 ms idle per 50 ms batch
    assert stats.gpu_idle_frac == pytest.approx(2e-3 / 0.052, rel=0.2)
    assert stats.flag.startswith("gpu idle")


def test_one_replay_longer_than_a_batch_is_its_own_batch() -> None:
    stats, _, _, ctr = window(noise=0.005, gpu={"replay_s": 0.15})
    assert stats.batch_replays == 1 and stats.flag is None
    assert rel_err(stats, ctr) <= 3 * stats.precision


def test_slow_counter_reads_still_open_and_close_a_window() -> None:
    """Reads of 2-12 ms (the H200's took up to 19 ms) on the reader's own thread: every window
    opens and closes, the GPU stays fed, and the stated precision still covers the error."""
    for seed in range(10):
        stats, _, _, ctr = window(seed, noise=0.005, read_s=2e-3, read_jitter_s=1e-2)
        assert stats.stop in ("precise", "max") and stats.flag is None
        assert stats.counter_read_s > 5e-3
        assert stats.gpu_idle_frac < en.MAX_IDLE_FRAC
        assert rel_err(stats, ctr) <= 3 * stats.precision


def test_reads_never_hold_back_the_feeder() -> None:
    """The feeder's own calls are launches, marks and syncs only: a read in progress cannot
    delay a sync (the H200's median 5 % idle when the feeding thread read the counter)."""
    stats, _, gpu, _ = window(noise=0.005, read_s=1.5e-2)
    assert all(e == "mark" or e.startswith(("launch", "sync")) for e in gpu.log)
    assert stats.counter_read_s == pytest.approx(1.5e-2, rel=0.01)
    assert stats.gpu_idle_frac is not None and stats.gpu_idle_frac < 1e-3


H200_READS = {"read_s": 2e-3, "read_jitter_s": 1e-2}  # reads of 2-12 ms (the H200's: up to 19)


def test_period_bounds_hold_the_true_period_and_refuse_a_counter_off_its_period() -> None:
    rng = random.Random(1)
    ticks = []
    for i in range(60):  # 0.1001 s period, reads 1-8 ms wide around each update
        t = 5.0 + 0.1001 * i + rng.uniform(-2e-4, 2e-4)
        ticks.append(Tick(t - rng.uniform(0, 8e-3), t + rng.uniform(1e-3, 8e-3), 1000 * i))
    lo, hi = period_bounds(ticks)
    assert lo <= 0.1001 <= hi and hi - lo < 1e-4  # a 10 s history pins it to 0.1 %
    # one update 3 ms off the grid, read tightly: no period fits within the 0.5 ms jitter
    bad = list(ticks)
    bad[30] = Tick(bad[30].t + 3e-3, bad[30].t + 3.2e-3, bad[30].mj)
    assert period_bounds(bad) is None
    assert period_bounds(ticks[:2]) is None  # too few to tell


def test_one_update_off_the_grid_costs_only_the_history_before_it() -> None:
    """As seen on the H200 (profiles/h200/session7): a single lagging read breaks a 10 s fit;
    the reader's period then comes from the updates after it, and still holds the true one."""
    rng = random.Random(2)
    hist = en.TickHistory()
    for i in range(100):
        t = 5.0 + 0.1001 * i + rng.uniform(-2e-4, 2e-4)
        lo, hi = t - rng.uniform(0, 8e-3), t + rng.uniform(1e-3, 8e-3)
        if i == 40:  # read tightly, 3 ms late: no period fits the 10 s
            lo, hi = t + 3e-3, t + 3.2e-3
        hist.add(Tick(lo, hi, 1000 * i))
    assert period_bounds(hist.ticks()) is None
    lo, hi = hist.period()
    assert lo <= 0.1001 <= hi and hi - lo < 2e-4  # 59 updates after the bad one pin it
    hist.add(Tick(15.0105, 15.013, 100_000))  # the next update reuses the found start
    lo, hi = hist.period()
    assert lo <= 0.1001 <= hi


def test_slow_reads_with_a_sweeps_history_stop_early_and_keep_their_precision() -> None:
    """The H200's case: slow reads, a reader that has read for the 10 s before. Steady power
    stops at the shortest window; the stated precision still covers the error."""
    within, within2, n, lengths = 0, 0, 30, []
    for seed in range(n):
        stats, _, _, ctr = window(seed, noise=0.005, history_s=10.0, walk=False,
                                  jitter_s=3e-4, **H200_READS)
        assert stats.stop == "precise" and stats.tick_fit and stats.flag is None
        assert stats.period_s[0] <= 0.1 <= stats.period_s[1]
        lengths.append(stats.window_s)
        err = rel_err(stats, ctr)
        within += err <= stats.precision
        within2 += err <= 2 * stats.precision
    assert within >= 0.68 * n and within2 >= 0.95 * n
    assert statistics.median(lengths) <= 0.6  # with the reads' own bounds: the 1 s maximum


def test_without_history_or_with_a_wandering_period_it_never_claims_more() -> None:
    """A first window (no history) and a counter whose period wanders by 1 ms an update (no
    grid fits it for long): the windows run longer, and stay within their stated precision."""
    for kw in ({"history_s": 0.0, "walk": False, "jitter_s": 3e-4},
               {"history_s": 10.0, "walk": True, "jitter_s": 1e-3}):
        within, within2, n = 0, 0, 30
        for seed in range(n):
            stats, _, _, ctr = window(seed, noise=0.005, **kw, **H200_READS)
            assert stats.stop in ("precise", "max")
            err = rel_err(stats, ctr)
            within += err <= stats.precision
            within2 += err <= 2 * stats.precision
        assert within >= 0.65 * n and within2 >= 0.9 * n, kw


def test_the_record_holds_every_update_the_reader_saw() -> None:
    stats, tr, _, _ = window(noise=0.005, history_s=1.0, **H200_READS)
    assert len(stats.tick_log) == len(tr.ticks) >= stats.ticks + 1
    t0, mj0 = tr.batches[0].start, tr.ticks[0].mj
    for (lo, hi, mj), k in zip(stats.tick_log, tr.ticks, strict=True):
        assert lo == pytest.approx(k.lo - t0, abs=1e-6) and hi == pytest.approx(k.hi - t0, abs=1e-6)
        assert mj == k.mj - mj0


def test_a_reader_that_fails_says_so_in_one_line() -> None:
    def broken() -> int:
        raise RuntimeError("NVML_ERROR_GPU_IS_LOST")

    reader = en.TickReader(broken, poll_s=1e-3).start()
    time.sleep(0.05)
    with pytest.raises(DqprofError, match="energy counter failed: NVML_ERROR_GPU_IS_LOST"):
        reader.ticks()
    reader.stop()


def test_a_counter_that_stops_gives_no_energy() -> None:
    stats, _, _, _ = window(stuck=True)
    assert stats.stop == "counter stopped" and stats.j_per_call is None
    assert "no tick-aligned window" in stats.flag


def test_measure_energy_sizes_batches_from_the_slower_figure() -> None:
    clock = SimClock()
    gpu = SimGpu(clock, replay_s=1e-3)

    class Replay:
        calls, device = 4, "cuda"

    class Nvml:
        energy_mj = SimCounter(clock, gpu, noise=0.005)

    # host view of a pass 1 ms (250 us a call), event-timed 200 us: batches of 50 replays
    stats = measure_energy(Replay(), Nvml(), 250e-6, 1.0, IDLE_W, 700.0, device=gpu,
                           reader=SimReader(clock, Nvml.energy_mj).start(), clock=clock)
    assert stats.batch_replays == 50 and stats.stop == "precise"
    assert stats.window_min_s == 0.3 and stats.window_max_s == 1.0


# -- the sweep ------------------------------------------------------------------------------

class _TickingNvml:
    """A counter that moves 3 J every 10 ms of host time (300 W), as NVML would."""

    energy_supported = True

    def energy_mj(self) -> int:
        return int(time.perf_counter() / 0.01) * 3000

    def state(self) -> dict:
        return {"sm_clock_mhz": 1}


def test_every_path_is_metered_no_path_opts_out() -> None:
    for name in backend_names():
        assert not hasattr(create(name), "energy_unsafe"), name


def test_sweep_records_how_each_window_was_fed_and_stopped(tmp_path) -> None:
    cfg = SweepConfig(model=TINY, shapes="down_proj", m=(1, 4), device="cpu", repeats=2,
                      l2_factor=0.02, backends="bf16", window_s=0.3, window_min_s=0.05,
                      energy_precision=0.01)
    sweep = Sweep(cfg, tmp_path)
    sweep.nvml = _TickingNvml()
    assert sweep.run()["ok"] == 2
    for rec in load_records(tmp_path):
        e = rec["energy"]
        assert e["feed"] == "batch-sync" and e["stop"] in ("precise", "max")
        assert e["ticks"] >= 5 and e["calls"] > 0 and e["j_per_call"] > 0
        assert e["precision_target"] == 0.01 and e["window_max_s"] == 0.3
        assert e["precision"] is not None and (e["stop"] == "max" or e["precision"] <= 0.01)
        assert rec["method"]["window_s"] == 0.3 and rec["method"]["window_min_s"] == 0.05
        assert rec["method"]["energy_precision"] == 0.01


def test_window_settings_come_from_suites_and_are_checked(tmp_path) -> None:
    suite = tmp_path / "s.toml"
    suite.write_text("window_s = 2.0\nwindow_min_s = 0.5\nenergy_precision = 0.01\n")
    cfg = load_suite(suite, SweepConfig())
    assert (cfg.window_s, cfg.window_min_s, cfg.energy_precision) == (2.0, 0.5, 0.01)
    old = tmp_path / "old.toml"  # a suite from before: window_s is the longest window now
    old.write_text("window_s = 0.3\n")
    plan(load_suite(old, SweepConfig(model=TINY)))
    for bad in ({"window_s": 0.0}, {"window_min_s": -1.0}, {"energy_precision": 0.0},
                {"energy_precision": 1.5}):
        with pytest.raises(DqprofError):
            plan(SweepConfig(model=TINY, **bad))


def test_bench_flags_reach_the_config(monkeypatch) -> None:
    from typer.testing import CliRunner

    from dqprof import sweep as sweep_mod
    from dqprof.cli import app

    seen = {}

    class Stop(Exception):
        pass

    def fake_sweep(cfg, run_dir, **kw):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(sweep_mod, "Sweep", fake_sweep)
    args = ["bench", "--device", "cpu", "--model", TINY, "--window", "2",
            "--window-min", "0.6", "--energy-precision", "1%"]
    with pytest.raises(Stop):
        CliRunner().invoke(app, args, catch_exceptions=False)
    cfg = seen["cfg"]
    assert (cfg.window_s, cfg.window_min_s, cfg.energy_precision) == (2.0, 0.6, 0.01)
    with pytest.raises(DqprofError, match="--energy-precision"):
        CliRunner().invoke(app, [*args[:-1], "half"], catch_exceptions=False)


# -- the weights made ahead ------------------------------------------------------------------

def test_weights_are_the_seeded_ones_made_once_per_shape() -> None:
    a = LinearShape("a", "g", 32, 16, (32,), ("a",), 1)
    b = LinearShape("b", "g", 8, 16, (8,), ("b",), 1)
    with _Weights(seed=3) as weights:
        weights.prefetch(b, keep=a)
        wa = weights.get(a)
        gen = torch.Generator(device="cpu").manual_seed(3)
        assert torch.equal(wa, torch.randn(32, 16, generator=gen) * 0.02)
        assert weights.get(a) is wa  # not made twice
        wb = weights.get(b)
        weights.prefetch(None, keep=b)  # a is dropped, b is kept
        assert weights.get(b) is wb and weights.get(a) is not wa


# -- timing measures nothing twice -----------------------------------------------------------

class _CountingReplay:
    calls, device = 1, "cpu"

    def __init__(self) -> None:
        self.passes = 0

    def __call__(self) -> None:
        self.passes += 1

    def sync(self) -> None:
        pass


def test_timing_sizes_samples_from_the_pass_already_timed() -> None:
    from dqprof.measure.timing import time_replay

    given = _CountingReplay()
    t = time_replay(given, repeats=3, warmup=0, pass_s=1e-3)
    assert given.passes == 3 * 2 and t.calls_per_sample == 2  # 2 ms samples of 1 ms passes
    fresh = _CountingReplay()
    time_replay(fresh, repeats=3)
    assert fresh.passes > 3 * 2  # warm-ups and a sizing pass of its own
