"""Per-layer energy per token: M per scenario, per-sequence layers, bf16 substitution."""

from __future__ import annotations

import analysis_fixtures as fx
import pytest

from dqprof.analysis.breakdown import DECODE, PREFILL, Scenario, per_token, totals
from dqprof.analysis.frame import points_frame


def _figure(recs, layer, backend, m, metric="energy_j"):
    r = next(r for r in recs if r["layer"] == layer and r["backend"] == backend and r["m"] == m
             and r["status"] == "ok")
    return r["energy"]["j_per_call"] if metric == "energy_j" else r["time"]["median_s"]


@pytest.mark.parametrize("metric", ["energy_j", "time_s"])
def test_decode_batch1_from_records(metric):
    recs = fx.records(fx.TINY)
    rows, left = per_token(points_frame(recs), DECODE[0], metric)
    assert not left
    for r in rows.itertuples():
        backend = "bf16" if r.substituted else r.series
        expected = r.calls_per_token * _figure(recs, r.layer, backend, 1, metric) / 1
        assert r.per_token == expected and r.how == "M=1 measured"


def test_prefill_runs_lm_head_once_per_sequence():
    recs = fx.records(fx.TINY)
    rows, _ = per_token(points_frame(recs), PREFILL[-1])
    head = rows[rows["layer"] == "lm_head"]
    assert (head["m"] == 1).all()
    for r in head.itertuples():
        assert r.per_token == r.calls_per_token * _figure(recs, "lm_head", "bf16", 1) / 2048
    body = rows[rows["layer"] != "lm_head"]
    assert (body["m"] == 2048).all()


def test_layers_left_bf16_use_the_bf16_record():
    rows, _ = per_token(points_frame(fx.records(fx.TINY)), DECODE[0])
    sub = rows[rows["substituted"]]
    assert set(sub["layer"]) == {"lm_head"} and set(sub["series"]) == {"bnb-nf4", "marlin-gptq"}
    assert sub["note"].str.contains("stays bf16").all()


def test_unmeasured_m_is_interpolated_and_said_so():
    recs = fx.records(fx.TINY)
    rows, _ = per_token(points_frame(recs), Scenario("decode", 64))
    assert rows["interpolated"].all()
    assert rows["how"].str.contains("between M=16 and M=256").all()
    r = rows[(rows["series"] == "bf16") & (rows["layer"] == "attn.o_proj")].iloc[0]
    lo, hi = _figure(recs, "attn.o_proj", "bf16", 16), _figure(recs, "attn.o_proj", "bf16", 256)
    assert min(lo, hi) <= r.per_call <= max(lo, hi)


def test_layer_without_figure_is_left_out_not_replaced():
    recs = fx.records(fx.TINY)
    for r in recs:
        if r["backend"] == "bnb-nf4" and r["layer"] == "attn.o_proj" and r["status"] == "ok":
            r["energy"] = None
    rows, left = per_token(points_frame(recs), DECODE[0])
    assert rows[(rows["series"] == "bnb-nf4") & (rows["layer"] == "attn.o_proj")].empty
    assert any("attn.o_proj" in x and "bnb-nf4" in x for x in left)


def test_totals_add_up():
    rows, _ = per_token(points_frame(fx.records(fx.TINY)), DECODE[-1])
    t = totals(rows)
    for s in t.index:
        assert t.loc[s, "total"] == pytest.approx(rows[rows["series"] == s]["per_token"].sum())


def test_a_cut_run_leaves_out_the_paths_it_did_not_reach():
    """A resumed sweep cut before marlin-gptq's last layer: no bf16 stand-in for that layer
    (it would make the path look cheaper), and no neighbouring M inside the layer's range."""
    recs = fx.records(fx.TINY)
    cut = [r for r in recs if not (r["backend"] == "marlin-gptq" and r["layer"] == "attn.o_proj")]
    rows, left = per_token(points_frame(cut), DECODE[0])
    assert rows[rows["series"] == "marlin-gptq"].empty
    assert any("marlin-gptq left out" in x and "attn.o_proj (not in the run)" in x for x in left)
    assert not rows[rows["series"] == "bnb-nf4"].empty  # the paths it reached keep their totals
    # bnb-nf4 reached M = 16 but not M = 256 on one layer: decode batch 64 is not filled in
    short = [r for r in recs if not (r["backend"] == "bnb-nf4" and r["layer"] == "attn.o_proj"
                                     and r["m"] > 16)]
    rows, left = per_token(points_frame(short), Scenario("decode", 64))
    assert rows[rows["series"] == "bnb-nf4"].empty
    assert any("bnb-nf4 left out" in x for x in left)


@pytest.mark.parametrize("flag, bound", [
    ("gpu idle 2.5% of the window (host could not keep it fed)", True),  # idle charged to calls
    ("zero energy", False),  # no figure at all: the path leaves the scenario
])
def test_an_idled_window_counts_as_an_upper_bound(flag, bound):
    from dqprof.analysis.breakdown import upper_bounds

    recs = fx.records(fx.TINY)
    hit = next(r for r in recs if r["backend"] == "bnb-nf4" and r["layer"] == "attn.o_proj"
               and r["m"] == 1 and r["status"] == "ok")
    hit["energy"]["flag"] = flag
    rows, left = per_token(points_frame(recs), DECODE[0])
    mine = rows[(rows["series"] == "bnb-nf4") & (rows["layer"] == "attn.o_proj")]
    if bound:
        assert not left and len(mine) == 1
        assert mine["per_call"].iloc[0] == hit["energy"]["j_per_call"]
        assert list(upper_bounds(rows)) == ["bnb-nf4"]
        assert "attn.o_proj at M=1: gpu idle 2.5%" in upper_bounds(rows)["bnb-nf4"][0]
    else:
        assert mine.empty and rows[rows["series"] == "bnb-nf4"].empty
        assert any("bnb-nf4 left out" in x for x in left) and not upper_bounds(rows)
    # time is never a bound: the window's idle does not touch the timed replays
    rows_t, _ = per_token(points_frame(recs), DECODE[0], "time_s")
    assert not upper_bounds(rows_t)
