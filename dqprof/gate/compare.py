"""The CI gate: compare a run with a baseline point by point, noise-aware.

Points are matched on their record ``key``. For each point both sides measured (status ok),
time per call (``time.median_s``) and energy per call (``energy.j_per_call``) are compared. A
change is a regression only when it is beyond BOTH the threshold (``max_slowdown``,
``max_energy_increase``) AND the point's noise band:

    band = noise_k * sqrt(noise_baseline**2 + noise_current**2)

where a side's time noise is its ``time.rel_spread`` (IQR / median of the timing samples) and
its energy noise adds the energy window's call-count error at its two ends (the record's own
figure where its feeder states one, see ``window_edge``) and the clock drift the window saw
(see ``energy_noise``). A point that ran into the power cap on either side is timed
by its sustained time per call inside the energy window instead of the burst median (see
``time_change``).
Why ``noise_k = 2``: the median of n samples has a standard error of about
1.25 sigma / sqrt(n) and the IQR is 1.35 sigma, so at the suites' 10 repeats the difference of
two medians has a standard error of about 0.29 * sqrt(s_b**2 + s_c**2); a band of 2 * sqrt(...)
sits about 7 standard errors out. That leaves room for run-to-run drift (clock and thermal
state, allocation) that the within-run IQR cannot see, so a rerun of the same commit does not
flag, while quiet points (spread below ~1.7 % a side) are gated by the threshold alone.
Improvements are the mirror image. Everything here is pure: it reads results, never a GPU.

Energy across boards: boards of one GPU model differ in power, so where the two sides were
measured on different boards (or either side's board is not recorded) energy is gated on a
figure normalized within each run, and the absolute change is shown beside it, not gated
(``dqprof.gate.boards``). Time keeps the rules above.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqprof.errors import DqprofError
from dqprof.results import KERNELS_FILE, RUN_FILE, dig, load_records, record_board, write_atomic

NOISE_K = 2.0
# measure.energy.CHUNK_S (not imported: that module pulls in torch). The chunked feeder (records
# without ``energy.feed``) counted calls per chunk of this much device time, so its call count is
# exact to about one chunk at each end of the window. Later feeders state their own edge error.
ENERGY_EDGE_S = 5e-3
# What the environment check compares: a difference in any of these makes timings suspect.
ENV_FIELDS = (
    ("GPU", ("environment", "gpu", "name")),
    ("driver", ("environment", "gpu", "driver")),
    ("power limit (W)", ("environment", "gpu", "power_limit_w")),
    *((name, ("environment", "versions", name)) for name in ("torch", "bitsandbytes", "vllm",
                                                              "triton")),
)
# Method settings whose difference changes what a figure means (warned, not refused).
CONFIG_FIELDS = ("repeats", "window_s", "l2_factor", "hot", "seed")
# Clock-event reasons that slow a point down for reasons outside the code under test.
SLOWDOWN_REASONS = {"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
                    "hw_power_brake_slowdown"}
CLOCK_DRIFT = 0.03  # median SM clocks further apart than this: clocks were not the same

REGRESSION, IMPROVEMENT, UNCHANGED = "regression", "improvement", "unchanged"
MISSING, NEW, FAILED = "missing", "new", "failed"  # not in current / not in baseline / broken


def parse_fraction(text: str | float) -> float:
    """'5%' or '0.05' -> 0.05. A bare number above 1 is refused: '5' is ambiguous."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise DqprofError(f"threshold '{text}': write a percentage (5%) or a fraction "
                          f"(0.05)") from None
    if not s.endswith("%") and value > 1:
        raise DqprofError(f"threshold '{text}': did you mean {s}%? (fractions are 0..1)")
    if not math.isfinite(value) or value < 0:
        raise DqprofError(f"threshold '{text}' must be a non-negative number")
    return value


@dataclass(frozen=True)
class Gate:
    max_slowdown: float = 0.05
    max_energy_increase: float = 0.07
    noise_k: float = NOISE_K
    fail_on_missing: bool = False  # points missing from the current run fail the gate too


# -- inputs ---------------------------------------------------------------------------------

@dataclass
class Side:
    """One side of the comparison: its records by key and the run.json that describes them."""

    path: Path
    records: dict[str, dict[str, Any]]
    run: dict[str, Any]  # {} where no run.json was found
    run_path: Path
    boards: dict[str, str | None] = field(default_factory=dict)  # key -> board UUID or None
    notes: list[str] = field(default_factory=list)  # how a baseline folder was read

    def board(self, key: str) -> str | None:
        return self.boards.get(key)


def run_json_for(path: Path) -> Path:
    """Where the environment of a results path lives: a run folder's run.json, or, for a
    ``name.jsonl`` file, ``name.run.json`` beside it (``run.json`` beside a kernels.jsonl)."""
    path = Path(path)
    if path.is_dir():
        return path / RUN_FILE
    if path.name == KERNELS_FILE:
        return path.parent / RUN_FILE
    return path.with_name(path.name.removesuffix(".jsonl") + ".run.json")


def read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DqprofError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(data, dict):
        raise DqprofError(f"{path}: expected a JSON object")
    return data


def load_side(path: Path) -> Side:
    path = Path(path)
    if not path.exists():
        raise DqprofError(f"{path}: no such run folder or results file")
    file = path / KERNELS_FILE if path.is_dir() else path
    by_key: dict[str, dict[str, Any]] = {}
    for rec in load_records(file):
        if rec["key"] in by_key:  # resume never redoes a key, so a repeat means a bad concat
            raise DqprofError(f"{file}: key '{rec['key']}' appears twice (use `dqprof merge` "
                              f"to join runs)")
        if rec["status"] == "ok" and not _positive(dig(rec, "time", "median_s")):
            raise DqprofError(f"{file}: ok record '{rec['key']}' has no time.median_s")
        by_key[rec["key"]] = rec
    run_path = run_json_for(path)
    run = read_json(run_path)
    boards = {k: record_board(r, run) for k, r in by_key.items()}
    return Side(path, by_key, run, run_path, boards)




def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


# -- the comparison -------------------------------------------------------------------------

@dataclass
class Change:
    """One figure of one point on both sides."""

    metric: str  # "time" or "energy"
    base: float
    cur: float
    band: float  # relative noise band
    limit: float  # the threshold for this metric
    basis: str = "absolute"  # energy across boards: "per bf16" or "board factor" (boards.py)
    gates: bool = True  # False: shown beside the gated figure, no verdict of its own

    @property
    def rel(self) -> float:
        return self.cur / self.base - 1

    @property
    def verdict(self) -> str:
        if not self.gates:
            return UNCHANGED
        beyond = abs(self.rel) > self.limit
        if beyond and abs(self.rel) > self.band:
            return REGRESSION if self.rel > 0 else IMPROVEMENT
        return "noise" if beyond else UNCHANGED


@dataclass
class Point:
    key: str
    status: str
    changes: list[Change] = field(default_factory=list)
    note: str = ""

    def change(self, metric: str) -> Change | None:
        return next((c for c in self.changes if c.metric == metric and c.gates), None)

    @property
    def worst(self) -> float:
        """Sort key: the largest relative change, failures first."""
        return max((c.rel for c in self.changes if c.gates), default=math.inf)


def time_noise(rec: dict[str, Any]) -> float:
    s = dig(rec, "time", "rel_spread")
    return float(s) if isinstance(s, int | float) and math.isfinite(s) and s > 0 else 0.0


def energy_doubt(rec: dict[str, Any]) -> str | None:
    """Why a record's energy window is not to be compared (its own flag, or a window that does
    not say how well it counted its calls), or None."""
    flag = dig(rec, "energy", "flag")
    if flag:
        return str(flag)
    if dig(rec, "energy", "feed") and math.isinf(window_edge(rec)):
        return "energy window states no call-count precision (energy.precision_parts.edges)"
    return None


def energy_noise(rec: dict[str, Any]) -> float:
    """Time jitter (energy = power x time), the window's call-count error, and drift.

    Drift: how far the sustained time per call inside the energy window strays from the
    burst-timed median. On the H200 that gap reached 5-15 % for points that ran into the power
    cap (clocks sag as the board heats), and exactly those points moved up to 7 % in energy
    between two back-to-back runs of one commit; quiet points keep a gap of 1-2 %.
    """
    drift = 0.0
    sustained, burst = dig(rec, "energy", "s_per_call_in_window"), dig(rec, "time", "median_s")
    if _positive(sustained) and _positive(burst):
        drift = abs(sustained / burst - 1)
    return math.sqrt(time_noise(rec) ** 2 + window_edge(rec) ** 2 + drift**2)


def window_edge(rec: dict[str, Any]) -> float:
    """The energy window's relative call-count error at its two ends (inf: not stated).

    Records without ``energy.feed`` (the chunked feeder): about one 5 ms chunk at each end. The
    batch-sync feeder states it: ``precision_parts.edges`` (tick-to-host jitter and the
    interpolation inside the two edge batches). Only that part of the record's ``precision``:
    its ``spread`` is the scatter of J/call from one counter interval to the next, the
    within-run image of what time jitter and drift stand for here (and it grows with the host
    times of the interior ticks, which the window's total does not depend on); its ``counter``
    (1 mJ at each end) is below 1e-4 of any window's energy.
    """
    energy = rec.get("energy") or {}
    if not energy.get("feed"):
        window = energy.get("window_s")
        return 2 * ENERGY_EDGE_S / window if _positive(window) else 0.0
    edges = dig(energy, "precision_parts", "edges")
    ok = isinstance(edges, int | float) and math.isfinite(edges) and edges >= 0
    return float(edges) if ok else math.inf


def power_capped(rec: dict[str, Any]) -> bool:
    return "sw_power_cap" in (dig(rec, "gpu_state", "throttle") or ())


def sustained_time(rec: dict[str, Any]) -> float | None:
    """Time per call over the energy window, where the window is trustworthy."""
    s = dig(rec, "energy", "s_per_call_in_window")
    return s if _positive(s) and not energy_doubt(rec) else None


def sustained_noise(rec: dict[str, Any]) -> float:
    return math.hypot(window_edge(rec), time_noise(rec))


def time_change(base: dict[str, Any], cur: dict[str, Any], gate: Gate) -> tuple[Change, str]:
    """The time figure to compare, and a note when it is not the burst median.

    At the power cap the burst median (a few ms of samples) runs at whatever clocks the
    previous point left behind: on the H200 two back-to-back runs of one commit timed bf16
    gate_up at M=2048 at 286 and 372 us, while the sustained time per call inside the 0.5 s
    energy windows was 334 and 335 us. So a point capped on either side is compared on the
    sustained figure; uncapped points keep the burst median (sustained/burst 0.996-1.004,
    10th-90th percentile, on the H200 profile).
    """
    k = gate.noise_k
    sb, sc = sustained_time(base), sustained_time(cur)
    if (power_capped(base) or power_capped(cur)) and sb and sc:
        band = k * math.hypot(sustained_noise(base), sustained_noise(cur))
        return (Change("time", sb, sc, band, gate.max_slowdown),
                "time: sustained in the energy window (power cap)")
    band = k * math.hypot(time_noise(base), time_noise(cur))
    return Change("time", base["time"]["median_s"], cur["time"]["median_s"], band,
                  gate.max_slowdown), ""


def compare_point(key: str, base: dict[str, Any], cur: dict[str, Any], gate: Gate,
                  across: Callable[[], tuple[Change | None, str]] | None = None) -> Point:
    """Both sides ok: time always, energy where both sides measured a trustworthy figure.

    ``across``: the two sides' boards differ (or are unknown): it gives the normalized energy
    change that gates instead of the absolute one (or None and why not)."""
    k = gate.noise_k
    time, how = time_change(base, cur, gate)
    changes = [time]
    notes = [how] if how else []
    eb, ec = dig(base, "energy", "j_per_call"), dig(cur, "energy", "j_per_call")
    flags = [f"{side}: {d}" for side, rec in (("baseline", base), ("current", cur))
             if (d := energy_doubt(rec))]
    if _positive(eb) and _positive(ec) and not flags:
        absolute = Change("energy", eb, ec, k * math.hypot(energy_noise(base), energy_noise(cur)),
                          gate.max_energy_increase, gates=across is None)
        if across is not None:
            normalized, why = across()
            changes += [normalized] if normalized else []
            notes += [why] if why else []
        changes.append(absolute)
    elif flags:
        notes.append(f"energy not compared: {'; '.join(flags)}")
    elif _positive(eb) != _positive(ec):
        notes.append(f"energy measured on the {'baseline' if _positive(eb) else 'current'} "
                     f"side only")
    notes += gpu_state_notes(base, cur)
    verdicts = {c.verdict for c in changes}
    status = (REGRESSION if REGRESSION in verdicts else
              IMPROVEMENT if IMPROVEMENT in verdicts else UNCHANGED)
    if "noise" in verdicts:
        noisy = [c.metric for c in changes if c.verdict == "noise"]
        notes.append(f"{' and '.join(noisy)} beyond threshold but within noise band")
    return Point(key, status, changes, "; ".join(notes))


def gpu_state_notes(base: dict[str, Any], cur: dict[str, Any]) -> list[str]:
    """What the GPU was doing during the current point that it was not doing in the baseline."""
    notes = []
    others = dig(cur, "gpu_state", "other_processes")
    if others:
        notes.append(f"{others} other process(es) on the GPU")
    before = set(dig(base, "gpu_state", "throttle") or ())
    now = (set(dig(cur, "gpu_state", "throttle") or ()) & SLOWDOWN_REASONS) - before
    if now:
        notes.append(f"throttled now: {', '.join(sorted(now))}")
    return notes


def median_sm_clock(side: Side) -> float | None:
    clocks = sorted(c for r in side.records.values()
                    if _positive(c := dig(r, "gpu_state", "sm_clock_mhz")))
    return clocks[len(clocks) // 2] if clocks else None


def classify(key: str, base: dict[str, Any] | None, cur: dict[str, Any] | None,
             gate: Gate, across: Callable[[], tuple[Change | None, str]] | None = None
             ) -> Point | None:
    """One key on both sides; None where neither side has a result worth reporting."""
    b_ok = base is not None and base["status"] == "ok"
    c_status = cur["status"] if cur is not None else None
    if b_ok and c_status == "ok":
        return compare_point(key, base, cur, gate, across)  # type: ignore[arg-type]
    if b_ok and c_status == "failed":
        return Point(key, REGRESSION, note=f"failed now: {cur.get('reason')}")  # type: ignore[union-attr]
    if b_ok:
        why = f"skipped now: {cur.get('reason')}" if cur else "not in the current run"
        return Point(key, MISSING, note=why)
    if c_status == "ok":
        why = f"{base['status']} in baseline: {base.get('reason')}" if base else "not in baseline"
        return Point(key, NEW, note=why)
    if c_status == "failed":
        return Point(key, FAILED, note=f"failed: {cur.get('reason')}"  # type: ignore[union-attr]
                     + (" (also in baseline)" if base and base["status"] == "failed" else ""))
    return None  # skipped or absent on both sides: nothing measured to compare


def run_value(run: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """An environment field of a run: the one value its sessions agree on (a session that
    lacked it, e.g. a resumed run's first session before vLLM was installed, does not count),
    a list where they differ, None where none had it."""
    vals = [dig(run, *keys)] + [dig(s, *keys) for s in run.get("sessions") or ()]
    seen = list(dict.fromkeys(v for v in vals if v is not None))
    return seen[0] if len(seen) == 1 else (seen or None)


def environment_warnings(base: Side, cur: Side) -> list[str]:
    """Loud notes for anything that makes the two sides' figures hard to compare."""
    out = []
    for side in (base, cur):
        if not side.run:
            out.append(f"no run.json for {side.path} (looked for {side.run_path}): cannot check "
                       f"that both sides ran on the same GPU, driver and libraries")
    if not (base.run and cur.run):
        return out
    for label, keys in ENV_FIELDS:
        b, c = run_value(base.run, keys), run_value(cur.run, keys)
        for side, vals in (("baseline", b), ("current", c)):
            if isinstance(vals, list):
                out.append(f"the {side} run's sessions ran on different {label}: "
                           f"{', '.join(map(repr, vals))}")
        if b != c:
            out.append(f"{label} differs: baseline {b!r}, current {c!r} (re-baseline on this "
                       f"runner's GPU and stack if this is intended)")
    b, c = median_sm_clock(base), median_sm_clock(cur)
    if b and c and abs(c / b - 1) > CLOCK_DRIFT:
        out.append(f"median SM clock during the points differs: baseline {b:.0f} MHz, current "
                   f"{c:.0f} MHz (clocks locked on one side only? see docs/ci.md)")
    for name in CONFIG_FIELDS:
        b, c = dig(base.run, "config", name), dig(cur.run, "config", name)
        if b != c:
            out.append(f"sweep setting {name} differs: baseline {b!r}, current {c!r}")
    return out


@dataclass
class Report:
    baseline: Side
    current: Side
    gate: Gate
    points: list[Point]
    warnings: list[str]

    def of(self, *statuses: str) -> list[Point]:
        return [p for p in self.points if p.status in statuses]

    @property
    def compared(self) -> int:
        return len(self.of(REGRESSION, IMPROVEMENT, UNCHANGED))

    @property
    def exit_code(self) -> int:
        if self.of(REGRESSION) or (self.gate.fail_on_missing and self.of(MISSING)):
            return 1
        return 0

    def headline(self) -> str:
        def n(count: int, word: str, plural: str | None = None) -> str:
            return f"{count} {word if count == 1 else plural or word + 's'}"

        text = (f"dqprof regress: {n(len(self.of(REGRESSION)), 'regression')}, "
                f"{n(len(self.of(IMPROVEMENT)), 'improvement')}, "
                f"{len(self.of(UNCHANGED))} unchanged, {len(self.of(MISSING, NEW))} missing")
        if self.of(FAILED):
            text += f", {len(self.of(FAILED))} failed"
        return text


def compare(baseline: Side, current: Side, gate: Gate = Gate()) -> Report:
    from dqprof.gate.boards import CrossBoard

    cross = CrossBoard(baseline, current, gate)
    keys = list(baseline.records) + [k for k in current.records if k not in baseline.records]
    points = [p for k in keys
              if (p := classify(k, baseline.records.get(k), current.records.get(k), gate,
                                cross.normalizer(k)))]
    order = {REGRESSION: 0, FAILED: 1, MISSING: 2, NEW: 3, IMPROVEMENT: 4, UNCHANGED: 5}
    points.sort(key=lambda p: (order[p.status], -p.worst if p.status == REGRESSION else 0))
    warnings = baseline.notes + environment_warnings(baseline, current) + cross.warnings()
    report = Report(baseline, current, gate, points, warnings)
    if report.compared == 0:
        raise DqprofError(f"no common points: {baseline.path} and {current.path} share no key "
                          f"measured ok on both sides (different suite or model?)")
    return report


def run_regress(baseline: Path, current: Path, gate: Gate = Gate()) -> Report:
    from dqprof.gate.boards import load_baseline

    cur = load_side(current)
    return compare(load_baseline(baseline, cur), cur, gate)


def write_baseline(current: Path, dest: Path) -> int:
    """Current ok records become the baseline (a .jsonl file with <name>.run.json beside it,
    or a run folder); returns how many records were written."""
    side = load_side(current)
    if not side.run:
        raise DqprofError(f"{current}: no run.json (looked for {side.run_path}): a baseline "
                          f"without its environment cannot warn about GPU or driver changes")
    ok = [r for r in side.records.values() if r["status"] == "ok"]
    if not ok:
        raise DqprofError(f"{current}: no ok records: refusing to write an empty baseline")
    dest = Path(dest)
    if dest.suffix != ".jsonl":
        dest.mkdir(parents=True, exist_ok=True)
    file = dest / KERNELS_FILE if dest.is_dir() else dest
    write_atomic(file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in ok))
    info = {**side.run, "baseline_of": {"source": str(side.path), "records": len(ok)}}
    write_atomic(run_json_for(dest), json.dumps(info, indent=1, sort_keys=True) + "\n")
    return len(ok)
