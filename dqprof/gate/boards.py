"""Energy across boards: a change of board is not a change of code.

Boards of one GPU model differ in power. On the H200 a ci-smoke run on a second board, gated
against a baseline from the first, kept its times within 2 % but drew 7-16 % less energy on 20
of 75 points; a static power offset of about 25 W at every point reproduces that pattern on the
recorded runs (tests/test_cross_board.py). So where the two sides of a point were measured on
different boards, or either side's board is not recorded, energy is gated on a figure
normalized within each run by a calibration the same run measured:

- **per bf16**: a point's energy per call over bf16's at the same shape and M (and the same
  hot/cold variant), bf16 measured on the same board in the same run. Its noise band is the
  root-sum-square of all four records' energy noise.
- **board factor**: the baseline's energy scaled by the median current/baseline energy ratio
  of the bf16 points that pair of boards measured (the board power factor; the median's error
  enters the band). Points without a bf16 partner (bf16 itself, bnb-dequant at m=0) are gated on
  this alone, with the ratios' point-to-point spread in the band too: boards differ by more
  than one factor (the committed baseline against session 8's board: bf16 from 0.86 to 1.00,
  robust sigma 6.5 %, so about ±14 % for bf16's own energy across those boards); so are
  points whose bf16 partner is missing, untrusted or on another board in either run, and each
  says so in its note and in a warning. Shards (``bench --shard``, ``--gpus``)
  keep every backend of a shape together, so within one sweep bf16 is on the same board.

Where a point has both, it gets an energy verdict only when both agree (each beyond threshold
and band; the weaker one is shown). Each is wrong in its own way when boards differ by a static
offset dP: per bf16 leaves (1 - dP/P_path) / (1 - dP/P_bf16) of it and adds bf16's noise,
the board factor leaves (1 - dP/P_path) / (1 - dP/P_bf16 typical). On the recorded points with
25 W taken off, either alone gave one board-caused verdict, together none; a path made 15 %
hungrier still fails on its decode points, and the slowed Triton kernel on exactly its six.

Gross energy is normalized, not energy above idle: on the two recorded same-board runs the
above-idle ratio is noisier (median |change| 1.8 % against 1.4 %), and it only cancels a board
offset that the idle reading at the start of the run also shows. A change that makes bf16
itself uniformly hungrier is absorbed by the board factor: bf16 is the calibration; its time
is still gated.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dqprof.errors import DqprofError
from dqprof.gate.compare import (
    Change,
    Gate,
    Side,
    _positive,
    energy_doubt,
    energy_noise,
    load_side,
)
from dqprof.results import (
    KERNELS_FILE,
    dig,
    normal_uuid,
    point_key,
    write_atomic,
)

CALIBRATION = "bf16"
ANY = ("*", "*")  # the run-wide factor: every pair of boards' bf16 points together
STRENGTH = {"unchanged": 0, "noise": 1, "regression": 2, "improvement": 2}


def short(uuid: str | None) -> str:
    return uuid[:12] + "…" if uuid else "unknown"


def trusted_energy(rec: dict[str, Any] | None) -> float | None:
    if rec is None or rec.get("status") != "ok" or energy_doubt(rec):
        return None
    e = dig(rec, "energy", "j_per_call")
    return float(e) if _positive(e) else None


def partner_key(rec: dict[str, Any]) -> str | None:
    """bf16 at the same model, shape and M, hot or cold as ``rec``; None for bf16 itself and
    for M-independent points (bnb-dequant's m=0)."""
    if rec["backend"] == CALIBRATION or not rec.get("m"):
        return None
    hot = "hot" if "hot" in str(rec.get("variant") or "").split(",") else ""
    return point_key(rec["model"], rec["layer"], rec["m"], CALIBRATION, hot)


@dataclass(frozen=True)
class BoardFactor:
    value: float  # median current/baseline energy of the bf16 points of one pair of boards
    noise: float  # relative uncertainty of that median
    points: int
    # relative spread of one point's ratio about the median (robust sigma): boards differ
    # point by point, not by one factor (bench/baselines/h200.jsonl against session 8's board:
    # bf16's ratio 0.86 at down_proj M=16 to 1.00 at sliding.qkv M=2048, sigma 6.5 %)
    spread: float = 0.0


def board_factor(ratios: list[float]) -> BoardFactor:
    med = statistics.median(ratios)
    n = len(ratios)
    if n >= 4:  # the median's standard error, from the quartile spread
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        spread = (q3 - q1) / 1.35 / med
        noise = 1.25 * spread / math.sqrt(n)
    else:
        spread = noise = (max(ratios) - min(ratios)) / med
    return BoardFactor(med, noise, n, spread)


class CrossBoard:
    """Which points of a comparison cross boards, and their normalized energy change."""

    def __init__(self, base: Side, cur: Side, gate: Gate):
        self.base, self.cur, self.gate = base, cur, gate
        self.factors: dict[tuple[str, str], BoardFactor] = {}
        self.crossed: dict[tuple[str, str], int] = {}  # pair of boards -> points compared
        self.uncalibrated = 0
        self.partnerless: dict[str, int] = {}  # why per bf16 was missing -> points
        ratios: dict[tuple[str, str], list[float]] = {}
        for key, b in base.records.items():
            c = cur.records.get(key)
            eb, ec = trusted_energy(b), trusted_energy(c)
            if b["backend"] != CALIBRATION or eb is None or ec is None:
                continue
            if self.same_board(key):
                continue
            ratios.setdefault(self.pair(key), []).append(ec / eb)
            ratios.setdefault(ANY, []).append(ec / eb)
        self.factors = {pair: board_factor(r) for pair, r in ratios.items()}

    def pair(self, key: str) -> tuple[str, str]:
        return (self.base.board(key) or "?", self.cur.board(key) or "?")

    def same_board(self, key: str) -> bool:
        b, c = self.base.board(key), self.cur.board(key)
        return b is not None and b == c

    def normalizer(self, key: str) -> Callable[[], tuple[Change | None, str]] | None:
        """None where both sides ran on one known board: absolute energy gates as before."""
        if self.same_board(key) or key not in self.base.records or key not in self.cur.records:
            return None
        return lambda: self._normalized(key)

    def _normalized(self, key: str) -> tuple[Change | None, str]:
        base, cur, k = self.base.records[key], self.cur.records[key], self.gate.noise_k
        pair = self.pair(key)
        self.crossed[pair] = self.crossed.get(pair, 0) + 1
        eb, ec = trusted_energy(base), trusted_energy(cur)
        assert eb is not None and ec is not None  # compare_point calls this for such points
        factor = self.factors.get(pair) or self.factors.get(ANY)
        per_bf16, lacking = self._per_bf16(key)
        by_factor = None
        if factor is not None:
            # gated by the factor alone (bf16 itself, no partner), a point's own ratio may sit
            # anywhere in the boards' point-to-point spread; with per bf16 beside it, the two
            # must agree, and the median's own error is the factor's part of the band
            alone = factor.spread if per_bf16 is None else 0.0
            by_factor = Change("energy", eb * factor.value, ec,
                               k * math.hypot(energy_noise(base), energy_noise(cur),
                                              factor.noise, alone),
                               self.gate.max_energy_increase, basis="board factor")
        notes = [self._absolute_note(eb, ec)]
        if lacking and by_factor is not None:  # said, never a silent fallback
            self.partnerless[lacking] = self.partnerless.get(lacking, 0) + 1
            notes.append(f"board factor alone: {lacking}")
        if factor is not None and pair not in self.factors:
            notes.append(f"run-wide board factor {factor.value:.3f} (this pair of boards "
                         f"measured no bf16)")
        if per_bf16 is None or by_factor is None:
            change = per_bf16 or by_factor
            if change is None:
                self.uncalibrated += 1
                return None, (f"energy not gated: boards differ (or are unknown) and no bf16 "
                              f"point measured on both sides calibrates them (absolute "
                              f"{ec / eb - 1:+.1%})" + (f"; {lacking}" if lacking else ""))
        else:  # a verdict needs both calibrations to agree: see the module's docstring
            change = per_bf16 if STRENGTH[per_bf16.verdict] <= STRENGTH[by_factor.verdict] \
                else by_factor
            other = by_factor if change is per_bf16 else per_bf16
            if STRENGTH[other.verdict] > STRENGTH[change.verdict]:
                notes.append(f"{other.basis} {other.rel:+.1%} (band ±{other.band:.1%}) alone "
                             f"would say {other.verdict}")
        return change, "; ".join(n for n in notes if n)

    def _per_bf16(self, key: str) -> tuple[Change | None, str]:
        """Energy over bf16's at the same point, bf16 measured on the same board, each side;
        else None and why, where the point has a bf16 partner to be normalized by."""
        base, cur = self.base.records[key], self.cur.records[key]
        pk = partner_key(base)
        if not pk:  # bf16 itself, M-independent points: the board factor is their calibration
            return None, ""
        pb, pc = self.base.records.get(pk), self.cur.records.get(pk)
        for name, side, partner in (("baseline", self.base, pb), ("current", self.cur, pc)):
            if partner is None:
                return None, f"bf16 at this shape and M is not in the {name} run"
            if trusted_energy(partner) is None:
                return None, (f"bf16 at this shape and M has no trusted energy in the {name} "
                              f"run ({partner['status']}"
                              + (f", {why}" if (why := energy_doubt(partner)) else "") + ")")
            if side.board(pk) != side.board(key):
                return None, (f"bf16 at this shape and M ran on another board in the {name} "
                              f"run (the shape's points were split across boards)")
        band = self.gate.noise_k * math.hypot(energy_noise(base), energy_noise(pb),
                                              energy_noise(cur), energy_noise(pc))
        return Change("energy", trusted_energy(base) / trusted_energy(pb),  # type: ignore[operator]
                      trusted_energy(cur) / trusted_energy(pc),  # type: ignore[operator]
                      band, self.gate.max_energy_increase, basis="per bf16"), ""

    def _absolute_note(self, eb: float, ec: float) -> str:
        """The absolute change, where it alone would have given a verdict."""
        rel = ec / eb - 1
        return (f"absolute energy {rel:+.1%} (boards differ: not gated)"
                if abs(rel) > self.gate.max_energy_increase else "")

    def warnings(self) -> list[str]:
        """The loud part: which boards differ and what factor was measured between them."""
        out = []
        for (b, c), n in sorted(self.crossed.items()):
            f = self.factors.get((b, c))
            fac = (f"board factor (bf16 energy, current/baseline, median of {f.points}): "
                   f"{f.value:.3f}" if f else "no bf16 point of this pair of boards: "
                   + ("run-wide factor used" if ANY in self.factors else "not calibrated"))
            if b == "?" or c == "?":
                where = "both sides" if b == c else "the baseline side" if b == "?" else (
                    "the current side")
                why = (f"board unknown on {where} "
                       f"(recorded before dqprof kept board UUIDs?): cannot tell a board change "
                       f"from a code change")
            else:
                why = "boards differ"
            out.append(f"{why}: baseline board {short(None if b == '?' else b)}, current "
                       f"board {short(None if c == '?' else c)}; energy of {n} point(s) gated "
                       f"normalized within each run (per bf16 at the same point, else by the "
                       f"board factor), absolute energy shown, not gated; {fac}")
        for why, n in sorted(self.partnerless.items()):
            out.append(f"energy of {n} point(s) gated by the board factor alone, not per bf16 "
                       f"at the same shape and M: {why}")
        if self.uncalibrated:
            out.append(f"energy of {self.uncalibrated} point(s) not gated at all: the boards "
                       f"differ and the runs share no bf16 point to calibrate by (add bf16 to "
                       f"--backends)")
        return out




# -- per-board baselines ----------------------------------------------------------------------

@dataclass
class BoardBaseline:
    uuid: str | None
    side: Side


def board_folder(path: Path) -> list[Path] | None:
    """The baseline files of a per-board baseline folder (a folder without kernels.jsonl that
    holds ``<board>.jsonl`` files, each with ``<board>.run.json``); None for anything else."""
    path = Path(path)
    if not path.is_dir() or (path / KERNELS_FILE).exists():
        return None
    return sorted(p for p in path.glob("*.jsonl"))


def side_board(side: Side) -> str | None:
    boards = {b for b in side.boards.values() if b}
    return boards.pop() if len(boards) == 1 else normal_uuid(
        dig(side.run, "environment", "gpu", "uuid"))


def load_baseline(path: Path, current: Side) -> Side:
    """A baseline run/file as it is, or from a per-board folder the file of each current
    record's board; a board with no file is compared with the newest file, energy normalized
    (compare.py sees different boards), and says so loudly."""
    files = board_folder(path)
    if files is None:
        return load_side(path)
    if not files:
        raise DqprofError(f"{path}: an empty baseline folder (write one with `dqprof regress "
                          f"--baseline {path} --current <run> --update-baseline --per-board`)")
    boards = [BoardBaseline(None, load_side(f)) for f in files]
    for b in boards:
        b.uuid = side_board(b.side)
    newest = max(boards, key=lambda b: (str(b.side.run.get("created") or ""), str(b.side.path)))
    by_uuid = {b.uuid: b for b in boards if b.uuid}
    wanted = {current.board(k) for k in current.records}
    picked = {u: by_uuid.get(u or "", newest) for u in wanted}
    lacking = sorted(str(u) for u, b in picked.items() if b.uuid is None or b.uuid != u)
    records, board_of = {}, {}
    for key in current.records:
        b = picked[current.board(key)]
        if key in b.side.records:
            records[key], board_of[key] = b.side.records[key], b.side.board(key)
    first = picked[current.board(next(iter(current.records)))] if current.records else newest
    notes = [f"per-board baseline {path}: " + ", ".join(
        f"current board {short(u)} -> {b.side.path.name}" for u, b in sorted(
            picked.items(), key=lambda x: str(x[0])))]
    if lacking:
        notes.append(f"baseline folder {path} has NO file for board(s) "
                     f"{', '.join(short(None if u == 'None' else u) for u in lacking)}: "
                     f"compared with the newest ({newest.side.path.name}), energy normalized "
                     f"across boards; add this board's baseline (`--update-baseline "
                     f"--per-board`) to gate its absolute energy")
    return Side(Path(path), records, first.side.run, first.side.run_path, board_of, notes)


def write_board_baselines(current: Path, folder: Path) -> list[tuple[str, int]]:
    """One ``<uuid>.jsonl`` (+ ``<uuid>.run.json``) per board of the current run's ok records;
    returns (uuid, records) per file written."""
    side = load_side(current)
    if not side.run:
        raise DqprofError(f"{current}: no run.json (looked for {side.run_path}): a baseline "
                          f"without its environment cannot warn about GPU or driver changes")
    per_board: dict[str, list[dict[str, Any]]] = {}
    for key, rec in side.records.items():
        if rec["status"] != "ok":
            continue
        uuid = side.board(key)
        if not uuid:
            raise DqprofError(f"{current}: record '{key}' does not say which board measured it "
                              f"(a run from before dqprof kept board UUIDs): a per-board "
                              f"baseline needs a run made now")
        per_board.setdefault(uuid, []).append({**rec, "board": rec.get("board") or {
            "uuid": uuid, "name": dig(side.run, "environment", "gpu", "name")}})
    if not per_board:
        raise DqprofError(f"{current}: no ok records: refusing to write an empty baseline")
    folder = Path(folder)
    out = []
    for uuid, recs in sorted(per_board.items()):
        write_atomic(folder / f"{uuid}.jsonl",
                     "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
        info = {**side.run, "baseline_of": {"source": str(side.path), "records": len(recs),
                                            "board": uuid}}
        write_atomic(folder / f"{uuid}.run.json", json.dumps(info, indent=1, sort_keys=True)
                     + "\n")
        out.append((uuid, len(recs)))
    return out

