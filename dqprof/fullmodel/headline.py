"""Each quantization's J/token and tokens/s relative to bf16 at the same workload and batch:
the full-model headline (the report's table, README).

A workload is judged by the phase it is made of: a decode-heavy call (more output than prompt
tokens) by its decode tokens, a prefill-heavy one by its prompt tokens. (Not by time: at
batch 1, 16 decode steps outlast a 2048-token prefill on an H200.) The whole
call's energy per output token is given too: it is what a user's meter sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BASELINE = "bf16"


@dataclass(frozen=True)
class Relative:
    quant: str
    workload: str
    batch: int
    phase: str  # the phase the workload is judged by
    j_per_token: float  # of that phase, total (idle included)
    j_vs_bf16: float | None
    j_above_idle_vs_bf16: float | None
    j_per_output_token_vs_bf16: float | None  # the whole call
    tokens_per_s_vs_bf16: float | None  # of that phase
    throttle: tuple[str, ...]  # reasons NVML gave while it ran (e.g. sw_power_cap)


def main_phase(record: dict[str, Any]) -> str:
    return "decode" if record["output_len"] >= record["input_len"] else "prefill"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def relative_to_bf16(records: list[dict[str, Any]]) -> list[Relative]:
    """One row per ok record (bf16's own rows included, at 1.0), by workload (in order of
    appearance), then quantization (likewise), then batch."""
    ok = [r for r in records if r.get("status") == "ok"]
    base = {(r["workload"], r["batch"]): r for r in ok if r["quant"] == BASELINE}
    out = []
    for r in ok:
        phase = main_phase(r)
        mine = r.get(phase) or {}
        if mine.get("j_per_token") is None:
            continue
        b = base.get((r["workload"], r["batch"]))
        theirs = (b or {}).get(phase) or {}
        out.append(Relative(
            r["quant"], r["workload"], r["batch"], phase, mine["j_per_token"],
            _ratio(mine["j_per_token"], theirs.get("j_per_token")),
            _ratio(mine.get("j_per_token_above_idle"), theirs.get("j_per_token_above_idle")),
            _ratio(r.get("j_per_output_token"), (b or {}).get("j_per_output_token")),
            _ratio(mine.get("tokens_per_s"), theirs.get("tokens_per_s")),
            tuple((r.get("gpu_state") or {}).get("throttle") or ())))
    workloads = list(dict.fromkeys(r.workload for r in out))
    quants = list(dict.fromkeys(r.quant for r in out))
    return sorted(out, key=lambda r: (workloads.index(r.workload), quants.index(r.quant),
                                      r.batch))
