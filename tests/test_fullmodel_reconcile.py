"""Linear-layer energy predicted from kernel records vs measured J/token (records built here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dqprof.cli import app
from dqprof.fullmodel.plot import plot_reconciliation
from dqprof.fullmodel.reconcile import (
    IDLE_PART,
    QUANT_BACKEND,
    backend_for,
    predict,
    reconcile,
)
from dqprof.fullmodel.records import ModelRecordWriter, base_record
from dqprof.fullmodel.synth import synth_fields
from dqprof.models.config import ModelConfig, load_config
from dqprof.models.shapes import linear_shapes
from dqprof.results import SCHEMA_VERSION, RecordWriter, point_key

FIELDS = synth_fields(load_config("gemma-4-e4b").fields, layers=2, vocab=4096)
SHAPES = linear_shapes(ModelConfig("tiny", FIELDS, "test"))
MS = (1, 16, 256)
SCALE = {"bf16": 2.0, "marlin-gptq": 1.0}


def _e(backend: str, n: int, k: int, m: int) -> float:
    return SCALE[backend] * n * k * 1e-12 * (1 + m / 64)


def _t(backend: str, n: int, k: int, m: int) -> float:
    return _e(backend, n, k, m) / 500.0  # 500 W while the kernel runs


def _kernel_records() -> list[dict]:
    recs = []
    for s in SHAPES:
        for backend in SCALE:
            for m in MS:
                recs.append({"schema": SCHEMA_VERSION, "kind": "kernel", "model": "tiny",
                             "key": point_key("tiny", s.name, m, backend), "layer": s.name,
                             "group": s.group, "n": s.n, "k": s.k, "m": m, "backend": backend,
                             "variant": "", "status": "ok",
                             "time": {"median_s": _t(backend, s.n, s.k, m)},
                             "energy": {"j_per_call": _e(backend, s.n, s.k, m),
                                        "j_per_call_above_idle": _e(backend, s.n, s.k, m) / 2}})
    # a record of another model's shape under the same name must not be used
    recs.append({**recs[0], "n": 1, "energy": {"j_per_call": 1e9}, "m": 4})
    return recs


KREC = _kernel_records()


def test_backend_map() -> None:
    assert QUANT_BACKEND == {"bf16": "bf16", "bitsandbytes": "bnb-nf4",
                             "gptq_marlin": "marlin-gptq", "awq_marlin": "marlin-awq",
                             "dqprof_nf4": "triton-nf4[stats=fp32]", "fp8": "fp8"}
    lm = next(s for s in SHAPES if s.name == "lm_head")
    mlp = next(s for s in SHAPES if s.name == "mlp.down_proj")
    assert backend_for("gptq_marlin", lm) == "bf16"  # the tied head stays bf16
    assert backend_for("gptq_marlin", mlp) == "marlin-gptq"
    # on Hopper vLLM logs Machete for GPTQ/AWQ: the prediction uses the Machete records
    assert backend_for("gptq_marlin", mlp, "Machete") == "machete-gptq"
    assert backend_for("awq_marlin", mlp, "Machete") == "machete-awq"
    assert backend_for("awq_marlin", lm, "Machete") == "bf16"
    assert backend_for("gptq_marlin", mlp, "Marlin") == "marlin-gptq"
    assert backend_for("bitsandbytes", mlp, "Machete") == "bnb-nf4"


def test_a_variant_backend_reads_its_variants_records() -> None:
    """dqprof_nf4 runs triton-nf4 on fp32 absmax: its prediction takes those records, not the
    default (nested) triton-nf4's."""
    from dqprof.fullmodel.reconcile import kernel_figures

    mlp = next(s for s in SHAPES if s.name == "mlp.down_proj")
    rec = {"status": "ok", "layer": mlp.name, "n": mlp.n, "k": mlp.k, "m": 8,
           "energy": {"j_per_call": 2.0}, "time": {"median_s": 2e-5}}
    recs = [{**rec, "backend": "triton-nf4", "variant": ""},
            {**rec, "backend": "triton-nf4", "variant": "stats=fp32",
             "energy": {"j_per_call": 1.0}, "time": {"median_s": 1e-5}}]
    e, t, method, _ = kernel_figures(recs, mlp, backend_for("dqprof_nf4", mlp), 8)
    assert (e, t, method) == (1.0, 1e-5, "exact")
    assert kernel_figures(recs, mlp, "triton-nf4", 8)[:2] == (2.0, 2e-5)


def test_machete_stands_in_labelled_only_when_the_profile_lacks_it() -> None:
    # KREC has no Machete records: Marlin stands in, and every quantized term says so
    p = predict(KREC, SHAPES, "gptq_marlin", "decode", 1, linear_kernel="Machete")
    assert p.j_per_token == pytest.approx(predict(KREC, SHAPES, "gptq_marlin", "decode", 1)
                                          .j_per_token)
    assert p.proxies == {"machete-gptq": "marlin-gptq"}
    quantized = [t for t in p.terms if t.layer != "lm_head"]
    assert quantized and all(t.proxy_for == "machete-gptq" for t in quantized)
    assert next(t for t in p.terms if t.layer == "lm_head").proxy_for == ""
    # with Machete records the real kernel is used and nothing stands in
    machete = [{**r, "backend": "machete-gptq", "energy": {"j_per_call": 3.0}}
               for r in KREC if r["backend"] == "marlin-gptq"]
    q = predict(KREC + machete, SHAPES, "gptq_marlin", "decode", 1, linear_kernel="Machete")
    assert q.proxies == {} and {t.backend for t in q.terms} == {"machete-gptq", "bf16"}
    assert next(t for t in q.terms if t.layer == "mlp.down_proj").j_per_call == 3.0
    # Machete timed without energy: its own time, Marlin's energy, and the row says so
    timed = [{**r, "backend": "machete-gptq", "energy": None,
              "time": {"median_s": 7.0}} for r in KREC if r["backend"] == "marlin-gptq"]
    t = predict(KREC + timed, SHAPES, "gptq_marlin", "decode", 1, linear_kernel="Machete")
    assert t.proxies == {"machete-gptq": "marlin-gptq energy"}
    assert t.j_per_token == pytest.approx(p.j_per_token)
    down = next(x for x in t.terms if x.layer == "mlp.down_proj")
    assert (down.backend, down.energy_from, down.s_per_call) == ("machete-gptq", "marlin-gptq",
                                                                 7.0)
    # no stand-in for a kernel that has none: bitsandbytes without records stays missing
    assert predict(KREC, SHAPES, "bitsandbytes", "decode", 1).j_per_token is None


def test_decode_exact_and_interpolated() -> None:
    p1 = predict(KREC, SHAPES, "gptq_marlin", "decode", 1)
    expected = sum(_e(backend_for("gptq_marlin", s), s.n, s.k, 1) * s.calls_per_token
                   for s in SHAPES)
    assert p1.j_per_token == pytest.approx(expected)
    assert {t.method for t in p1.terms} == {"exact"}
    p4 = predict(KREC, SHAPES, "gptq_marlin", "decode", 4)
    # M=4 sits half-way between 1 and 16 in log M: the geometric mean, per 4 tokens
    expected = sum(math.sqrt(_e(b, s.n, s.k, 1) * _e(b, s.n, s.k, 16)) * s.calls_per_token / 4
                   for s in SHAPES for b in [backend_for("gptq_marlin", s)])
    assert p4.j_per_token == pytest.approx(expected)
    assert {t.method for t in p4.terms} == {"log-interp"}
    assert p4.terms[0].m_used == (1, 16)
    big = predict(KREC, SHAPES, "gptq_marlin", "decode", 1024)
    # past the largest measured M (256) the per-call figure scales with M: per token it
    # stays what M=256 gave
    assert {t.method for t in big.terms} == {"linear-extrap"} and big.terms[0].m_used == (256,)
    assert big.s_per_token == pytest.approx(sum(
        _t(backend_for("gptq_marlin", s), s.n, s.k, 256) * s.calls_per_token / 256
        for s in SHAPES))


def test_prefill_chunks_and_lm_head_per_sequence() -> None:
    p = predict(KREC, SHAPES, "bf16", "prefill", batch=2, prompt_len=100, chunk=128)
    assert p.m == 128
    lm = next(t for t in p.terms if t.layer == "lm_head")
    s = next(s for s in SHAPES if s.name == "lm_head")
    e2 = math.exp(math.log(_e("bf16", s.n, s.k, 1)) + math.log(2) / math.log(16) * (
        math.log(_e("bf16", s.n, s.k, 16)) - math.log(_e("bf16", s.n, s.k, 1))))
    assert lm.m == 2 and lm.j_per_token == pytest.approx(e2 / 200)
    down = next(t for t in p.terms if t.layer == "mlp.down_proj")
    assert down.m == 128 and down.calls == pytest.approx(2 / 128)
    assert predict(KREC, SHAPES, "bf16", "prefill", 2, 100).m == 200  # no chunk limit


def test_missing_backend_is_named() -> None:
    p = predict(KREC, SHAPES, "awq_marlin", "decode", 1)
    assert p.j_per_token is None
    assert "lm_head" not in p.missing and "mlp.down_proj" in p.missing


def _model_record(quant: str, batch: int, decode_j: float, decode_s: float) -> dict:
    return {**base_record("tiny", quant, "decode", 128, 512, batch), "status": "ok",
            "checkpoint": "unused", "idle_power_w": 100.0,
            "engine": {"max_num_batched_tokens": 8192},
            "decode": {"j_per_token": decode_j, "j_per_token_above_idle": decode_j / 2,
                       "s_per_token": decode_s},
            "prefill": {"j_per_token": 1e-3, "j_per_token_above_idle": 5e-4,
                        "s_per_token": 1e-5}}


def test_reconcile_explains_a_fraction() -> None:
    pred = predict(KREC, SHAPES, "gptq_marlin", "decode", 16)
    rec = _model_record("gptq_marlin", 16, 2 * pred.j_per_token, 3 * pred.s_per_token)
    rows = reconcile([rec], KREC, SHAPES)
    dec = next(r for r in rows if r.phase == "decode")
    assert dec.explained_fraction == pytest.approx(0.5)
    assert dec.remainder_j_per_token == pytest.approx(pred.j_per_token)
    assert dec.idle_in_remainder_j_per_token == pytest.approx(100.0 * 2 * pred.s_per_token)
    assert IDLE_PART in dec.remainder_parts and "attention" in dec.remainder_parts
    assert sum(dec.by_group.values()) == pytest.approx(pred.j_per_token)
    assert dec.methods == {"exact": len(SHAPES)}
    pre = next(r for r in rows if r.phase == "prefill")
    assert pre.m == 16 * 128 and pre.measured_j_per_token == 1e-3  # under the 8192 chunk
    above = reconcile([rec], KREC, SHAPES, above_idle=True)[0]
    assert above.basis == "above_idle" and IDLE_PART not in above.remainder_parts
    assert above.predicted_j_per_token == pytest.approx(pred.j_per_token / 2)
    failed = {**rec, "status": "failed"}
    assert reconcile([failed], KREC, SHAPES) == []
    # a flagged phase (decode as a sliver of a prefill-heavy call) is not reconciled
    sliver = {**rec, "decode": {**rec["decode"], "flag": "decode is 4% of the call"}}
    assert [r.phase for r in reconcile([sliver], KREC, SHAPES)] == ["prefill"]


def test_plot(tmp_path: Path) -> None:
    recs = [_model_record(q, b, 1e-2 * b ** -0.5, 1e-4) for q in ("bf16", "gptq_marlin")
            for b in (1, 16)]
    fig = plot_reconciliation(recs, KREC, SHAPES, path=tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert len(fig.axes) == 2


def test_cli_reconcile(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**FIELDS, "_name_or_path": "tiny"}))
    with RecordWriter(tmp_path / "kernels") as w:
        for r in KREC[:-1]:
            w.write(r)
    with ModelRecordWriter(tmp_path / "run") as w:
        w.write({**_model_record("bf16", 16, 0.05, 1e-4), "checkpoint": str(tmp_path / "cfg")})
    r = CliRunner().invoke(app, ["model", "reconcile", str(tmp_path / "run"), "--kernels",
                                 str(tmp_path / "kernels"), "--json", "--plot",
                                 str(tmp_path / "fig.png")])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert {row["phase"] for row in rows} == {"decode", "prefill"}
    assert (tmp_path / "fig-decode.png").exists()


def test_m_independent_records() -> None:
    from dqprof.fullmodel.reconcile import kernel_figures

    s = next(s for s in SHAPES if s.name == "mlp.down_proj")
    rec = {**KREC[0], "layer": s.name, "n": s.n, "k": s.k, "m": 0, "backend": "x",
           "energy": {"j_per_call": 0.5}, "time": {"median_s": 1e-3}}
    assert kernel_figures([rec], s, "x", 64) == (0.5, 1e-3, "m-independent", (0,))


def test_in_situ_breakdown_per_token_and_its_energy_estimate() -> None:
    pred = predict(KREC, SHAPES, "gptq_marlin", "decode", 8)
    rec = _model_record("gptq_marlin", 8, 4e-3, 1e-3)
    # a profiled decode step of 8 tokens: 6 ms of linears, 1 ms attention, 0.5 ms norms,
    # 0.5 ms idle; 8 ms span
    rec["in_situ"] = {"decode": {
        "status": "ok", "tokens_per_step": 8.0, "span_s": 8e-3, "idle_s": 0.5e-3,
        "host_s": 9e-3, "named_fraction": 1.0, "assignment": "by order",
        "linear_by_group": {"mlp.gate_up": 4e-3, "attn.qkv": 2e-3},
        "categories": {"attention": 1e-3, "norm/elementwise": 0.5e-3}},
        "prefill": {"status": "failed", "reason": "profiler: no CUPTI"}}
    rows = reconcile([rec], KREC, SHAPES)
    dec = next(r for r in rows if r.phase == "decode")
    v = dec.in_situ
    assert v["status"] == "ok" and v["linear_s_per_token"] == pytest.approx(6e-3 / 8)
    assert v["linear_by_group_s_per_token"]["mlp.gate_up"] == pytest.approx(0.5e-3)
    assert v["rest_s_per_token"]["attention"] == pytest.approx(1e-3 / 8)
    assert v["idle_s_per_token"] == pytest.approx(0.5e-3 / 8)
    assert v["host_s_per_token"] == pytest.approx(9e-3 / 8)
    assert v["predicted_over_in_situ"] == pytest.approx(pred.s_per_token / (6e-3 / 8))
    e = v["energy_j_per_token"]  # J/token x time share of the 8 ms step
    assert e["linear mlp.gate_up"] == pytest.approx(4e-3 * 4 / 8)
    assert e["attention"] == pytest.approx(4e-3 / 8) and e["idle"] == pytest.approx(4e-3 / 16)
    assert sum(e.values()) == pytest.approx(4e-3)  # the parts fill the span here
    assert "estimate" in v["energy_method"]
    pre = next(r for r in rows if r.phase == "prefill")
    assert pre.in_situ == {"status": "failed", "reason": "profiler: no CUPTI"}
    assert reconcile([_model_record("gptq_marlin", 8, 4e-3, 1e-3)], KREC, SHAPES)[0] \
        .in_situ is None


def test_decode_step_figure_stacks_the_profiled_parts(tmp_path: Path) -> None:
    from dqprof.analysis.fullmodel_section import _in_situ
    from dqprof.fullmodel.insitu import UNASSIGNED
    from dqprof.fullmodel.plot import plot_decode_steps, step_parts

    prof = {"status": "ok", "tokens_per_step": 1.0, "span_s": 8e-3, "idle_s": 0.5e-3,
            "linear_by_group": {"mlp.gate_up": 4e-3, "attn.qkv": 2e-3},
            "categories": {"attention": 1e-3, "norm/elementwise": 0.3e-3, "sampling": 0.2e-3}}
    parts = step_parts(prof)
    assert parts == pytest.approx({"linear mlp.gate_up": 4e-3, "linear attn.qkv": 2e-3,
                                   "attention": 1e-3, "other": 0.5e-3, "idle": 0.5e-3})
    # linears the trace could not match to layers keep their own name (not "linear linear")
    lone = step_parts({**prof, "linear_by_group": {UNASSIGNED: 6e-3}})
    assert set(lone) == {UNASSIGNED, "attention", "other", "idle"}
    recs = []
    for q in ("bf16", "bitsandbytes"):
        for b in (1, 8):
            r = _model_record(q, b, 4e-3, 1e-3)
            r["in_situ"] = {"decode": prof}
            recs.append(r)
    recs.append(_model_record("gptq_marlin", 1, 4e-3, 1e-3))  # no profile: no bar
    fig = plot_decode_steps(recs, path=tmp_path / "steps.png")
    assert (tmp_path / "steps.png").stat().st_size > 0
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bf16\nB=1", "bf16\nB=8",
                                                           "bnb\nB=1", "bnb\nB=8"]
    heights = sum(p.get_height() for p in ax.patches) / 4
    assert heights == pytest.approx(8.0)  # ms per step: the parts fill the span
    assert plot_decode_steps([_model_record("bf16", 1, 1e-3, 1e-3)]) is None
    rows = reconcile(recs, KREC, SHAPES)
    table = _in_situ(rows)[0]
    assert len(table.rows) == 4  # the decode rows that carry a profile
    assert table.rows[0][5] == "6e+03" and table.rows[0][-1] == "-"
