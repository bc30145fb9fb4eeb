"""J/token relative to bf16 per (workload, batch): the full-model headline (records built here)."""

from __future__ import annotations

import pytest

from dqprof.fullmodel.headline import relative_to_bf16
from dqprof.fullmodel.records import base_record


def _rec(quant: str, workload: str, batch: int, j: float, tps: float, **extra) -> dict:
    inp, out = (128, 512) if workload == "decode" else (2048, 16)
    phase = {"j_per_token": j, "j_per_token_above_idle": j - 0.5, "tokens_per_s": tps}
    other = {"j_per_token": 99.0, "j_per_token_above_idle": 98.0, "tokens_per_s": 1.0}
    return {**base_record("m", quant, workload, inp, out, batch), "status": "ok",
            "j_per_output_token": 2 * j,
            "decode": phase if workload == "decode" else other,
            "prefill": other if workload == "decode" else phase, **extra}


def test_ratios_to_bf16_at_the_same_workload_and_batch() -> None:
    recs = [_rec("gptq_marlin", "decode", 1, 1.5, 90.0,
                 gpu_state={"throttle": ["sw_power_cap"]}),
            _rec("bf16", "decode", 1, 2.0, 100.0), _rec("bf16", "decode", 8, 1.0, 100.0),
            _rec("bitsandbytes", "decode", 8, 2.5, 40.0),
            _rec("bitsandbytes", "prefill", 8, 0.3, 50.0),  # no bf16 prefill: no ratio
            {**base_record("m", "awq_marlin", "decode", 128, 512, 1), "status": "failed",
             "reason": "oom"}]
    rows = relative_to_bf16(recs)
    # by workload, then quantization, then batch, in order of appearance; failed left out
    assert [(r.workload, r.quant, r.batch) for r in rows] == [
        ("decode", "gptq_marlin", 1), ("decode", "bf16", 1), ("decode", "bf16", 8),
        ("decode", "bitsandbytes", 8), ("prefill", "bitsandbytes", 8)]
    gptq, bnb, lone = rows[0], rows[3], rows[4]
    assert gptq.j_vs_bf16 == pytest.approx(0.75)
    assert gptq.j_above_idle_vs_bf16 == pytest.approx(1.0 / 1.5)
    assert gptq.j_per_output_token_vs_bf16 == pytest.approx(0.75)
    assert gptq.tokens_per_s_vs_bf16 == pytest.approx(0.9)
    assert gptq.throttle == ("sw_power_cap",)
    assert bnb.j_vs_bf16 == pytest.approx(2.5) and bnb.phase == "decode"
    assert rows[1].j_vs_bf16 == 1.0
    # a prefill-heavy workload is judged by its prompt tokens, and has no baseline here
    assert lone.phase == "prefill" and lone.j_per_token == 0.3 and lone.j_vs_bf16 is None
