"""Format or path: the split of bnb-nf4's excess over the best fused int4 path, recomputed from
records (the committed H200 profile's and the fixtures' cost model), its signs, and what is
said where a path or a figure is missing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import analysis_fixtures as fx
import pytest

from dqprof.analysis import fmt
from dqprof.analysis import format_path as fp
from dqprof.analysis import format_path_section as fps
from dqprof.analysis.breakdown import DECODE, PREFILL, per_token, totals
from dqprof.analysis.compute import analyze
from dqprof.analysis.doc import Items, Para, Table
from dqprof.analysis.findings import format_or_path
from dqprof.analysis.frame import points_frame

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "h200" / "kernels.jsonl"
SPLIT = (*fx.BACKENDS, "triton-nf4", "tinygemm-int4", "marlin-awq")


def _profile_records(layers: set[str]) -> list[dict]:
    with PROFILE.open() as f:
        return [r for r in map(json.loads, f) if r["layer"] in layers]


def _fig(r: dict, metric: str) -> float:
    if r.get("status") != "ok":
        return math.nan
    if metric == "time_s":
        return r["time"]["median_s"]
    e = r.get("energy") or {}
    flag = e.get("flag") or ""
    doubtful = flag.startswith(("zero", "implausible", "gpu idle"))
    return math.nan if doubtful or e.get("j_per_call") is None else e["j_per_call"]


@pytest.mark.skipif(not PROFILE.exists(), reason="profiles/h200/kernels.jsonl not committed")
@pytest.mark.parametrize("metric", ["time_s", "energy_j"])
def test_point_split_recomputed_from_the_committed_profile(metric):
    layers = {"mlp.gate_up_proj", "mlp.down_proj"}
    recs = _profile_records(layers)
    pts = points_frame(recs)
    splits = fp.point_splits(pts, metric)
    # the fused NF4 kernel on bnb-nf4's own statistics plays the fused role where the run has it
    fused = ("triton-nf4", fp.SAME_STATS if any(r.get("variant") == fp.SAME_STATS for r in recs)
             else "")
    assert fp.roles_of(pts).fused == (f"{fused[0]}[{fused[1]}]" if fused[1] else fused[0])
    checked = 0
    for row in splits.itertuples():
        here = [r for r in recs if r["layer"] == row.layer and r["m"] == row.m]
        at = {r["backend"]: _fig(r, metric) for r in here if not r.get("variant")}
        nf4 = next((_fig(r, metric) for r in here
                    if (r["backend"], r.get("variant") or "") == fused), math.nan)
        cands = {b: at[b] for b in fp.INT4 if b in at and math.isfinite(at[b])}
        if not cands or not math.isfinite(at["bnb-nf4"]) or not math.isfinite(nf4):
            assert row.missing or not cands
            continue
        best = min(cands, key=cands.__getitem__)
        assert row.best_series == best and row.best == cands[best]
        assert row.path == at["bnb-nf4"] - nf4
        assert row.format == nf4 - cands[best]
        assert math.isclose(row.path + row.format, row.gap)
        if row.gap > 0:
            assert math.isclose(row.path_share + row.format_share, 1.0)
        checked += 1
    assert checked >= len(layers) * 10


def test_token_split_matches_the_per_token_totals():
    recs = fx.records(fx.TINY, backends=SPLIT)
    a = analyze(fx.make_run(recs))
    pts = points_frame(recs)
    for metric in ("time_s", "energy_j"):
        t = a.format_path.tokens[metric]
        assert list(t["label"]) == [sc.label for sc in (*DECODE, PREFILL[-1])]
        for row in t.itertuples():
            tot = totals(per_token(pts, row.scenario, metric)[0])["total"]
            int4 = {s: tot[s] for s in ("marlin-gptq", "marlin-awq", "tinygemm-int4")}
            best = min(int4, key=int4.__getitem__)
            assert (row.nf4, row.fused, row.best_series) == (tot["bnb-nf4"],
                                                             tot["triton-nf4"], best)
            assert row.path == tot["bnb-nf4"] - tot["triton-nf4"]
            assert row.format == tot["triton-nf4"] - int4[best]


def _scaled_run(triton: float = 1.0, nf4: float = 1.0):
    """The fixture run with triton-nf4's (or bnb-nf4's) cost scaled, energy with it."""
    cfg = fx.load_config(fx.TINY)
    shapes = fx.select_shapes(fx.linear_shapes(cfg), None)
    scale = {"triton-nf4": triton, "bnb-nf4": nf4}
    recs = [fx.record(cfg.name, s, b, m, time_scale=scale.get(b, 1.0))
            for s in shapes for b in SPLIT for m in ((0,) if b == "bnb-dequant" else fx.MS)]
    return analyze(fx.make_run(recs))


def test_negative_path_is_kept_and_said():
    a = _scaled_run(triton=50.0)  # triton-nf4 far slower than bitsandbytes' own path
    row = a.format_path.tokens["energy_j"].iloc[0]
    assert row["reading"] == "path negative" and row["path"] < 0
    assert row["format_share"] > 1 and row["path_share"] < 0  # not clipped
    text = format_or_path(a)
    assert text.startswith("At decode (batch 1)")
    assert f"path part is negative ({fmt.mj(row['path'])})" in text
    assert f"{fmt.mj(row['format'])} ({fmt.pct(row['format_share'])} of the gap)" in text
    assert "upper bound" in text


def test_format_free_where_triton_beats_every_int4_path():
    a = _scaled_run(triton=0.05)
    t = a.format_path.tokens["time_s"]
    row = t.iloc[0]
    assert row["reading"] == "format free" and row["format"] < 0 and row["path_share"] > 1
    text = fps.token_sentence(a.format_path, "time_s", DECODE[0])
    assert "the format costs nothing" in text and fmt.us(-row["format"]) in text
    table = fps.token_table(a.format_path, "time_s")
    assert table.rows[0][-1] == fps.READING["format free"]


def test_no_gap_where_bnb_nf4_is_already_cheapest():
    a = _scaled_run(nf4=0.01)
    row = a.format_path.tokens["energy_j"].iloc[0]
    assert row["reading"] == "no gap" and math.isnan(row["path_share"])
    text = format_or_path(a)
    assert "no excess to split" in text and fmt.mj(row["nf4"]) in text


def test_split_arithmetic_signs():
    s = fp.split(10.0, 4.0, {"a": 3.0, "b": 1.0, "c": math.nan})
    assert (s["best_series"], s["gap"], s["path"], s["format"]) == ("b", 9.0, 6.0, 3.0)
    assert math.isclose(s["path_share"], 6 / 9) and s["reading"] == "split"
    assert fp.split(10.0, 4.0, {})["reading"] == ""  # no int4 path: no split, no reading


def test_doubtful_energy_is_not_split():
    recs = fx.records(fx.TINY, backends=SPLIT)
    hit = next(r for r in recs if r["backend"] == "triton-nf4" and r["status"] == "ok"
               and r["m"] == 16)
    hit["energy"]["flag"] = "gpu idle 9.0% of the window (host could not keep it fed)"
    splits = fp.point_splits(points_frame(recs), "energy_j")
    row = splits[(splits["layer"] == hit["layer"]) & (splits["m"] == 16)].iloc[0]
    assert math.isnan(row["fused"]) and math.isnan(row["path"]) and not row["reading"]
    assert row["missing"] == ("triton-nf4: energy dropped (gpu idle 9.0% of the window (host "
                              "could not keep it fed))")
    time_row = fp.point_splits(points_frame(recs), "time_s")
    assert time_row["missing"].eq("").all()  # the time figure stays


def test_missing_triton_nf4_is_named_with_what_it_needs():
    a = analyze(fx.make_run(fx.records(fx.TINY)))  # bf16, bnb-nf4, marlin-gptq: no triton
    f = a.format_path
    assert not f.splittable and format_or_path(a) is None
    blocks = fps.section(a, {})
    text = " ".join(getattr(b, "text", "") for b in blocks)
    assert "No split: this run lacks triton-nf4." in text
    notes = next(b for b in blocks if isinstance(b, Items)).items
    assert any(n.startswith("triton-nf4: not in this run (needs `dqprof bench --backends "
                            "triton-nf4`") for n in notes)
    assert any(n.startswith("gemlite-int4: not in this run") for n in notes)


def test_int4_path_without_energy_is_left_out_of_the_energy_best():
    cfg = fx.load_config(fx.TINY)
    shapes = fx.select_shapes(fx.linear_shapes(cfg), None)
    recs = [fx.record(cfg.name, s, b, m, energy=b != "marlin-gptq")
            for s in shapes for b in SPLIT for m in ((0,) if b == "bnb-dequant" else fx.MS)]
    a = analyze(fx.make_run(recs))
    f = a.format_path
    assert f.coverage["energy_j"].no_figure == {
        "marlin-gptq": "timed, no energy figure in any record"}
    assert "marlin-gptq" not in set(f.points["energy_j"]["best_series"])
    assert "marlin-gptq" in set(f.points["time_s"]["best_series"])
    notes = fps.coverage_notes(f)
    assert ("marlin-gptq: timed, no energy figure in any record: the energy split's best is "
            "over the other int4 paths") in notes


def _model(quant: str, batch: int, j: float, workload: str = "decode") -> dict:
    from dqprof.fullmodel.records import base_record

    lens = (128, 512) if workload == "decode" else (2048, 16)
    phase = "decode" if workload == "decode" else "prefill"
    return {**base_record("tiny", quant, workload, *lens, batch), "status": "ok",
            phase: {"j_per_token": j, "j_per_token_above_idle": j / 2, "tokens_per_s": 1 / j}}


def test_model_split_by_workload_and_batch():
    recs = [_model("bf16", 1, 2.0), _model("bitsandbytes", 1, 2.4),
            _model("dqprof_nf4", 1, 1.6), _model("gptq_marlin", 1, 1.5),
            _model("awq_marlin", 1, 1.4), _model("bitsandbytes", 8, 0.5),
            _model("gptq_marlin", 8, 0.2), _model("bitsandbytes", 1, 0.02, "prefill"),
            _model("dqprof_nf4", 1, 0.01, "prefill"), _model("gptq_marlin", 1, 0.015,
                                                              "prefill")]
    s = fp.model_splits(recs)
    assert list(zip(s["workload"], s["batch"], strict=True)) == [
        ("decode", 1), ("decode", 8), ("prefill", 1)]
    d1 = s.iloc[0]
    assert d1["best_series"] == "awq_marlin"
    assert (d1["gap"], d1["path"], d1["format"]) == (2.4 - 1.4, 2.4 - 1.6, 1.6 - 1.4)
    assert s.iloc[1]["missing"] == "dqprof_nf4: no ok record" and math.isnan(s.iloc[1]["path"])
    assert s.iloc[2]["reading"] == "format free"  # dqprof_nf4 below gptq_marlin
    blocks = fps.model_text(s)
    said = blocks[0].items
    assert said[0].startswith("In vLLM, decode workload at batch 1, bitsandbytes exceeds "
                              "awq_marlin")
    assert fmt.mj(2.4 - 1.6) in said[0]


def test_model_without_dqprof_nf4_gives_the_gap_and_says_what_is_needed():
    s = fp.model_splits([_model("bitsandbytes", 1, 2.4), _model("gptq_marlin", 1, 1.5)])
    blocks = fps.model_text(s)
    text = " ".join(b.text for b in blocks if isinstance(b, Para))
    assert "no ok dqprof_nf4 record (needs `dqprof model run --quant dqprof_nf4@" in text
    table = next(b for b in blocks if isinstance(b, Table))
    assert table.rows[0][6] == fmt.mj(2.4 - 1.5) and table.rows[0][7] == fmt.DASH


def test_model_without_int4_still_names_the_path():
    s = fp.model_splits([_model("bf16", 1, 2.0), _model("bitsandbytes", 1, 2.4),
                         _model("dqprof_nf4", 1, 1.8), _model("bitsandbytes", 1, 0.02,
                                                             "prefill"),
                         _model("dqprof_nf4", 1, 0.03, "prefill")])
    said = fps.model_text(s)[0].items
    assert said[0].startswith("In vLLM, decode workload at batch 1, bitsandbytes costs "
                              f"{fmt.mj(2.4)} per decode token and dqprof_nf4")
    assert f"path is {fmt.mj(2.4 - 1.8)}, {fmt.pct(0.6 / 2.4)}" in said[0]
    # a fused kernel slower than bitsandbytes cannot split anything: it says so, no number
    assert "cannot tell the path from the format" in said[1] and "path is" not in said[1]


def test_figure_has_a_panel_per_metric_and_m():
    from dqprof.analysis.figures import format_path_figure

    a = analyze(fx.make_run(fx.records(fx.TINY, backends=SPLIT)))
    fig, caption = format_path_figure(a)
    assert len(fig.axes) == 4 and "M=1 and 2048" in caption
    assert format_path_figure(analyze(fx.make_run(fx.records(fx.TINY)))) is None


def test_triton_nf4_that_never_ran_is_reported_not_split():
    recs = fx.records(fx.TINY, backends=SPLIT)
    for r in recs:
        if r["backend"] == "triton-nf4" and r["status"] == "ok":
            r.update(status="failed", reason="relative error 0.5 > 2e-2")
    a = analyze(fx.make_run(recs))
    f = a.format_path
    assert f.splittable and format_or_path(a) is None  # in the run, but nothing to split
    assert (f.tokens["time_s"]["missing"]
            == "triton-nf4: no total in this scenario").all()
    assert ("triton-nf4: no ok point (relative error 0.5 > 2e-2): no time split"
            in fps.coverage_notes(f))
    rows = fp.point_splits(a.points, "time_s")
    assert rows["missing"].str.startswith("triton-nf4: failed (relative error").all()
    from dqprof.analysis.figures import format_path_figure

    assert format_path_figure(a) is None


def test_the_same_statistics_kernel_plays_the_fused_part_where_the_run_has_it():
    from dqprof.analysis.format_path import roles_of

    recs = fx.records(fx.TINY, backends=("bf16", "bnb-nf4", "triton-nf4", "marlin-gptq"))
    assert roles_of(points_frame(recs)).fused == "triton-nf4"
    from dqprof.models.config import load_config
    from dqprof.models.shapes import linear_shapes

    cfg = load_config(fx.TINY)
    same = [fx.record(cfg.name, s, "triton-nf4", m, variant="stats=fp32", time_scale=1.05)
            for s in linear_shapes(cfg) for m in fx.MS]
    roles = roles_of(points_frame(recs + same))
    assert roles.fused == "triton-nf4[stats=fp32]" and roles.nf4 == "bnb-nf4"
