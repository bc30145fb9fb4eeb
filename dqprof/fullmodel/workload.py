"""What a full-model run executes: workloads x batch sizes, each as generate calls (pure).

A point is one (workload, batch). It runs in two phases inside one engine:
- ``full``: batch prompts of ``input_len`` token ids, ``output_len`` tokens each (ignore_eos);
- ``prefill``: the same prompts with max_tokens=1, i.e. the prefill and one sampled token.
Each phase is warmed up, then repeated in a steady-state window until it lasts at least
``min_s`` and spans at least ``min_ticks`` energy-counter updates (with NVML) - whole calls
only. Per call, prefill energy and time come from the prefill phase; decode is the full phase
minus the prefill phase, spread over ``batch * (output_len - 1)`` decode tokens.

Prompts are fresh random token ids for every call (and prefix caching is off in the engine),
so no call reuses another's KV cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from dqprof.errors import DqprofError

SPLIT_METHOD = ("prefill = a max_tokens=1 call at the same batch and prompt length; "
                "decode = full call minus prefill call, over batch*(output_len-1) tokens")
TICK_S = 0.1  # the H200's NVML energy counter period, for estimates only
# Below this share of the call, the decode figure (a difference of two measured calls) is
# mostly their noise: on the H200, 2048-in/16-out at batch 32 left decode 8 % of the call.
MIN_DECODE_SHARE = 0.25
FIRST_TOKEN_ID = 3  # skip pad/eos/bos (0, 1, 2 in Gemma)


@dataclass(frozen=True)
class Workload:
    name: str
    input_len: int
    output_len: int


WORKLOADS = {"decode": Workload("decode", 128, 512), "prefill": Workload("prefill", 2048, 16)}
DEFAULT_BATCHES = (1, 8, 32, 128)


@dataclass(frozen=True)
class Point:
    workload: Workload
    batch: int

    @property
    def label(self) -> str:
        return f"{self.workload.name} b={self.batch}"


@dataclass(frozen=True)
class WindowRule:
    min_s: float = 5.0
    min_ticks: int = 50
    max_calls: int = 100_000

    def done(self, elapsed_s: float, ticks: int | None, calls: int) -> bool:
        """Whether a window of ``calls`` whole calls is long enough (ticks None: no NVML)."""
        if calls < 1:
            return False
        if calls >= self.max_calls:
            return True
        return elapsed_s >= self.min_s and (ticks is None or ticks >= self.min_ticks)

    def calls_needed(self, call_s: float, tick_s: float = TICK_S) -> int:
        """Calls a window will take if every call lasts ``call_s`` (an estimate)."""
        span = max(self.min_s, self.min_ticks * tick_s)
        return min(self.max_calls, max(1, math.ceil(span / max(call_s, 1e-9))))


def parse_workloads(text: str) -> list[Workload]:
    """Comma-separated names (decode, prefill) or IN:OUT token counts (e.g. 16:8)."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item in WORKLOADS:
            out.append(WORKLOADS[item])
            continue
        try:
            i, o = (int(v) for v in item.split(":"))
        except ValueError:
            raise DqprofError(f"workload '{item}': use {', '.join(WORKLOADS)} or IN:OUT token "
                              f"counts (e.g. 16:8)") from None
        if i < 1 or o < 2:
            raise DqprofError(f"workload '{item}': need IN >= 1 and OUT >= 2 (decode = OUT-1)")
        out.append(Workload(f"{i}:{o}", i, o))
    if not out:
        raise DqprofError("no workload given")
    return out


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise DqprofError(f"--batch takes comma-separated integers (got '{text}')") from None
    if not values or min(values) < 1:
        raise DqprofError(f"--batch needs positive integers (got '{text}')")
    return values


def plan(workloads: list[Workload], batches: tuple[int, ...]) -> list[Point]:
    """Batches ascending, each with every workload: a budget cut drops the largest batches
    of all workloads rather than a whole workload."""
    return [Point(w, b) for b in sorted(set(batches)) for w in workloads]


def engine_limits(points: list[Point]) -> dict[str, object]:
    """What one engine must hold for every point: context, sequences, decode graph sizes."""
    return {"max_model_len": max(p.workload.input_len + p.workload.output_len for p in points),
            "max_num_seqs": max(p.batch for p in points),
            "cudagraph_capture_sizes": sorted({p.batch for p in points})}


def make_prompts(batch: int, input_len: int, vocab: int, seed: int, salt: tuple[int, ...]
                 ) -> list[list[int]]:
    """Random token ids, distinct per (seed, salt): every call prefills fresh prompts."""
    rng = np.random.default_rng([seed, *salt])
    ids = rng.integers(FIRST_TOKEN_ID, vocab, size=(batch, input_len))
    return ids.tolist()


def point_fits(remaining_s: float, rule: WindowRule, full_call_s: float,
               prefill_call_s: float) -> bool:
    """Whether both windows of a point can finish in ``remaining_s`` (after its warm-up)."""
    need = sum(rule.calls_needed(c) * c + c + 2 * TICK_S for c in (full_call_s, prefill_call_s))
    return need <= remaining_s


def budget_share(remaining_s: float, runs_left: int) -> float:
    """An even share of what is left, so a slow first quantization cannot starve the rest."""
    return remaining_s / max(1, runs_left)


# -- turning two measured windows into per-token figures -----------------------------------

@dataclass(frozen=True)
class Window:
    """A steady-state window of whole calls of one phase."""

    calls: int
    seconds: float  # first call start to last call end
    tokens_in: int  # prompt tokens over the window
    tokens_out: int  # generated tokens over the window
    energy_j: float | None = None  # window energy, the idle gaps at its ends taken out
    raw_energy_j: float | None = None  # counter difference between the bounding ticks
    tick_window_s: float | None = None  # between the bounding ticks
    gap_s: float | None = None  # tick window minus busy time (GPU idle, charged at idle power)
    ticks: int | None = None  # counter updates inside the tick window

    def as_dict(self) -> dict:
        return asdict(self)


def _per(x: float | None, n: float) -> float | None:
    return x / n if x is not None and n > 0 else None


def derive(point: Point, full: Window, prefill: Window, idle_w: float | None) -> dict:
    """Per-token energy, throughput and power of a point, prefill and decode split."""
    b, w = point.batch, point.workload
    tf, tp = full.seconds / full.calls, prefill.seconds / prefill.calls
    ef = _per(full.energy_j, full.calls)
    ep = _per(prefill.energy_j, prefill.calls)

    def above(e: float | None, t: float) -> float | None:
        return e - idle_w * t if e is not None and idle_w is not None else None

    out_tok, in_tok, dec_tok = b * w.output_len, b * w.input_len, b * (w.output_len - 1)
    ed = ef - ep if ef is not None and ep is not None else None
    share = (tf - tp) / tf
    flag = None
    if share < MIN_DECODE_SHARE:
        flag = (f"decode is {share:.0%} of the call: a small difference of two measured calls; "
                f"take decode figures from a decode-heavy workload")
    return {
        "s_per_call": tf, "prefill_s_per_call": tp,
        "j_per_call": ef, "prefill_j_per_call": ep,
        "tokens_per_s": out_tok / tf,
        "j_per_output_token": _per(ef, out_tok),
        "j_per_output_token_above_idle": _per(above(ef, tf), out_tok),
        "j_per_token": _per(ef, in_tok + out_tok),  # every processed token, prompt included
        "j_per_token_above_idle": _per(above(ef, tf), in_tok + out_tok),
        "power_w": _per(full.energy_j, full.seconds),
        "prefill": {"tokens": in_tok, "s_per_token": tp / in_tok, "tokens_per_s": in_tok / tp,
                    "j_per_token": _per(ep, in_tok),
                    "j_per_token_above_idle": _per(above(ep, tp), in_tok),
                    "power_w": _per(prefill.energy_j, prefill.seconds)},
        "decode": {"tokens": dec_tok, "s_per_token": (tf - tp) / dec_tok,
                   "tokens_per_s": dec_tok / (tf - tp) if tf > tp else None,
                   "j_per_token": _per(ed, dec_tok),
                   "j_per_token_above_idle": _per(above(ed, tf - tp), dec_tok),
                   "share_of_call": share, "flag": flag},
        "idle_power_w": idle_w,
        "split_method": SPLIT_METHOD,
    }
