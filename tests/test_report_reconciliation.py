"""A run folder holding model.jsonl next to kernels.jsonl gets the reconciliation figure."""

from __future__ import annotations

from dqprof.analysis.report import make_report
from dqprof.fullmodel.reconcile import predict
from dqprof.fullmodel.records import ModelRecordWriter, base_record
from dqprof.models.config import load_config
from dqprof.models.shapes import linear_shapes
from tests.analysis_fixtures import records, write_run

MODEL = "tests/data/tiny-llama.json"


def _model_record(quant: str, batch: int, j: float, s: float) -> dict:
    return {**base_record("tiny-llama", quant, "decode", 128, 512, batch), "status": "ok",
            "idle_power_w": 100.0, "engine": {"max_num_batched_tokens": 8192},
            "decode": {"j_per_token": j, "j_per_token_above_idle": j / 2, "s_per_token": s},
            "prefill": {"j_per_token": j / 10, "j_per_token_above_idle": j / 20,
                        "s_per_token": s / 10}}


def test_model_results_join_the_report(tmp_path) -> None:
    kernel = records(MODEL, backends=("bf16",), ms=(1, 16))
    run = write_run(tmp_path / "run", kernel, {"schema": 1, "kind": "kernels",
                                                "model": MODEL, "environment": {}})
    pred = predict(kernel, linear_shapes(load_config(MODEL)), "bf16", "decode", 1)
    with ModelRecordWriter(run) as w:  # the linears explain half of the measured J/token
        w.write(_model_record("bf16", 1, 2 * pred.j_per_token, 2 * pred.s_per_token))
        w.write(_model_record("bitsandbytes", 1, 3 * pred.j_per_token, 3 * pred.s_per_token))
        w.write({**base_record("tiny-llama", "gptq_marlin", "decode", 128, 512, 1),
                 "status": "failed", "reason": "engine start: out of memory"})
    res = make_report([run], tmp_path / "out")
    assert (tmp_path / "out" / "reconciliation.png").exists()
    assert "bf16 B=1: 50%" in (tmp_path / "out" / "report.html").read_text()
    assert not any("reconciliation" in x for x in res.left_out)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| bitsandbytes | decode | 1 | decode |" in md
    bnb = next(line for line in md.splitlines() if line.startswith("| bitsandbytes"))
    assert "| 1.50x |" in bnb  # 3x vs 2x the linears' J/token
    # every configuration has figures or its recorded reason
    assert "gptq_marlin decode B=1: engine start: out of memory" in md


def test_no_model_results_no_figure(tmp_path) -> None:
    run = write_run(tmp_path / "run", records(MODEL, backends=("bf16",), ms=(1,)),
                    {"schema": 1, "kind": "kernels", "model": MODEL, "environment": {}})
    make_report([run], tmp_path / "out")
    assert not (tmp_path / "out" / "reconciliation.png").exists()
