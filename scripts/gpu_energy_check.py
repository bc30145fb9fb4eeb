"""Check the batch-sync energy feeder on a GPU: every path metered, precision, idle, repeat spread.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 scripts/gpu_energy_check.py        (GPU machine)

Runs the sweep's own code, one Sweep per backend into $OUT/energy-check/<backend>/ (records
as the sweep writes them, so they come back with $OUT): bf16, marlin-gptq and machete-gptq on
mlp.gate_up_proj, mlp.down_proj and sliding.qkv_proj at M = 1, 16, 256, 2048, with rotated
weight copies past L2 and attribution, as `dqprof bench` makes them. Each point's energy
window runs twice back to back; the second is kept in the record as ``energy.repeat``. One
child process per backend: if a GPU stalls, the sweep's point watchdog (60 s here) records the
point failed and exits its process, and only that backend's remaining points are lost.
Machete and Marlin need vLLM; without it they are skipped with the reason. About 2-3 minutes.

Prints one row per point (window, counter updates, precision reached, why it stopped, GPU idle,
J/call, the repeat's difference) and a summary per backend; writes summary.json beside them.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# DQPROF_CHECK_BACKENDS="bf16,tinygemm-int4" checks other paths (e.g. without vLLM staged);
# DQPROF_CHECK_PRECISION="2%" stops the windows where a sweep with that precision would
BACKENDS = tuple(
    os.environ.get("DQPROF_CHECK_BACKENDS", "bf16,marlin-gptq,machete-gptq").split(","))
SHAPES = "mlp.gate_up_proj,mlp.down_proj,sliding.qkv_proj"
MS = (1, 16, 256, 2048)
CHILD_LIMIT_S = 170


def child(backend: str, run_dir: str) -> None:
    """One backend's sweep, every energy window measured twice back to back."""
    import dqprof.measure.energy as en
    from dqprof.sweep import Sweep, SweepConfig

    once = en.measure_energy

    class Twice:
        def __init__(self, first: dict, second: dict) -> None:
            self.d = {**first, "repeat": second}

        def as_dict(self) -> dict:
            return self.d

    def twice(*args: object, **kw: object) -> Twice:
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            d = once(*args, **kw).as_dict()
            runs.append({**d, "host_s": time.perf_counter() - t0})
        return Twice(*runs)

    en.measure_energy = twice  # the sweep imports it from the module at each point
    cfg = SweepConfig(shapes=SHAPES, m=MS, backends=backend, point_timeout_s=60)
    if os.environ.get("DQPROF_CHECK_PRECISION"):  # e.g. "2%": the sweep's --energy-precision
        from dqprof.gate.compare import parse_fraction

        cfg.energy_precision = parse_fraction(os.environ["DQPROF_CHECK_PRECISION"])
    counts = Sweep(cfg, Path(run_dir)).run()
    print(backend, counts, flush=True)


def rel(a: float | None, b: float | None) -> float | None:
    return abs(b / a - 1) if a and b else None


def first_interval_dev(e: dict) -> float | None:
    """How far the window's first update interval's power lies from the rest (the ramp)."""
    rows = e.get("intervals") or []
    if len(rows) < 3:
        return None
    power = [j / s for s, j, _ in rows if s > 0]
    return power[0] / statistics.fmean(power[1:]) - 1


def table(out: Path, rcs: dict[str, int | str]) -> dict:
    header = (f"{'point':<40} {'win s':>6} {'ticks':>5} {'prec %':>7} {'stop':>8} "
              f"{'idle %':>7} {'J/call':>10} {'rep Δ %':>8} {'host s':>7}  flag")
    print(header)
    summary: dict[str, dict] = {}
    for backend in BACKENDS:
        path = out / backend / "kernels.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        deltas, windows, hosts, precs, ramps, stops, flagged = [], [], [], [], [], [], 0
        z_scores, fitted = [], 0  # repeat difference over the two windows' stated precisions
        for r in recs:
            label = f"{r['layer']} m={r['m']} {backend}"
            e = r.get("energy")
            if r["status"] != "ok" or not e:
                print(f"{label:<40} {r['status']}: {(r.get('reason') or 'no energy')[:90]}")
                continue
            rep = e.get("repeat") or {}
            delta = rel(e.get("j_per_call"), rep.get("j_per_call"))
            for w in (e, rep):
                if w:
                    windows.append(w["window_s"])
                    hosts.append(w["host_s"])
                    stops.append(w["stop"])
                    if w.get("precision") is not None:
                        precs.append(w["precision"])
                    if (dev := first_interval_dev(w)) is not None:
                        ramps.append(dev)
            if delta is not None and not e["flag"] and not rep.get("flag"):
                deltas.append(delta)
                if e.get("precision") and rep.get("precision"):
                    z_scores.append(delta / math.hypot(e["precision"], rep["precision"]))
            fitted += bool(e.get("tick_fit")) + bool(rep.get("tick_fit"))
            flagged += bool(e["flag"]) + bool(rep.get("flag"))
            prec = f"{e['precision'] * 100:.2f}" if e.get("precision") is not None else "-"
            idle = f"{e['gpu_idle_frac'] * 100:.2f}" if e.get("gpu_idle_frac") is not None else "-"
            jpc = f"{e['j_per_call']:.3e}" if e.get("j_per_call") else "-"
            dl = f"{delta * 100:.2f}" if delta is not None else "-"
            print(f"{label:<40} {e['window_s']:>6.3f} {e['ticks']:>5} {prec:>7} {e['stop']:>8} "
                  f"{idle:>7} {jpc:>10} {dl:>8} {e['host_s']:>7.3f}  {e['flag'] or ''}")
        ok = [r for r in recs if r["status"] == "ok"]
        summary[backend] = {
            "child_rc": rcs.get(backend), "records": len(recs), "ok": len(ok),
            "metered": sum(1 for r in ok if r.get("energy") and r["energy"].get("j_per_call")),
            "windows_flagged": flagged,
            "median_repeat_delta": statistics.median(deltas) if deltas else None,
            "p90_repeat_delta": (sorted(deltas)[math.ceil(0.9 * len(deltas)) - 1]
                                 if deltas else None),
            "median_window_s": statistics.median(windows) if windows else None,
            "median_host_s_per_window": statistics.median(hosts) if hosts else None,
            "median_precision": statistics.median(precs) if precs else None,
            "stopped_precise": stops.count("precise"), "stopped_max": stops.count("max"),
            # two windows of one point, each within its stated precision as often as claimed,
            # differ by less than one combined sigma in ~68 % of points, two in ~95 %
            "repeat_within_1_sigma": (sum(z <= 1 for z in z_scores) / len(z_scores)
                                      if z_scores else None),
            "repeat_within_2_sigma": (sum(z <= 2 for z in z_scores) / len(z_scores)
                                      if z_scores else None),
            "windows_on_period_grid": fitted,
            "median_abs_first_interval_dev": statistics.median(map(abs, ramps)) if ramps else None,
            # a run's first point also carries its group's `prepare`: median over those that have it
            "phase_median_s": {k: statistics.median(r["wall_s"][k] for r in ok if k in r["wall_s"])
                               for k in dict.fromkeys(k for r in ok for k in r["wall_s"])},
        }
    print()
    for backend, s in summary.items():
        print(backend, json.dumps(s))
    return summary


def main() -> None:
    out = Path(os.environ.get("OUT", "runs")) / "energy-check"
    out.mkdir(parents=True, exist_ok=True)
    from dqprof.kernels import create

    rcs: dict[str, int | str] = {}
    for backend in BACKENDS:
        if why := create(backend).unavailable("cuda"):
            print(f"== {backend}: skipped: {why}", flush=True)
            rcs[backend] = f"skipped: {why}"
            continue
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--child", backend, str(out / backend)],
                               capture_output=True, text=True, timeout=CHILD_LIMIT_S)
            rcs[backend] = p.returncode
            tail = [ln for ln in (p.stdout + p.stderr).splitlines() if "warn" not in ln.lower()]
            print(f"== {backend}: rc {p.returncode}, {time.time() - t0:.0f} s", flush=True)
            print("\n".join(tail[-4:]), flush=True)
        except subprocess.TimeoutExpired:
            rcs[backend] = "timeout"
            print(f"== {backend}: TIMEOUT after {CHILD_LIMIT_S} s", flush=True)
    summary = table(out, rcs)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
    else:
        main()
