"""Break-even M, ratios against bf16, the byte budget, interpolation."""

from __future__ import annotations

import math

import analysis_fixtures as fx
import pytest

from dqprof.analysis.breakeven import break_even, break_even_one, byte_budget, vs_reference
from dqprof.analysis.frame import points_frame
from dqprof.analysis.interp import nearest_m, value_at
from dqprof.bytemodel import bf16_gemm


@pytest.mark.parametrize(("ratios", "expected"), [
    ([0.5, 0.8, 0.9], "never"),
    ([1.0, 1.5, 2.0], "always"),
    ([0.5, 1.2, 2.0], "16"),
    ([0.5, 0.7, 1.1], "256"),
    ([1.2, 0.7, 1.1], "256"),  # non-monotonic: named in the note
    ([0.5, 1.2, 0.9], "never"),
])
def test_break_even_definition(ratios, expected):
    ms = [1, 16, 256]
    be, cross, note = break_even_one(ms, ratios)
    assert be == expected
    if be.isdigit():
        j = ms.index(int(be))
        assert all(r >= 1 for r in ratios[j:]) and ratios[j - 1] < 1
        # the crossing is where the log-log line between the two points reaches ratio 1
        t = math.log(cross / ms[j - 1]) / math.log(ms[j] / ms[j - 1])
        lr = math.log(ratios[j - 1]) + t * (math.log(ratios[j]) - math.log(ratios[j - 1]))
        assert lr == pytest.approx(0.0, abs=1e-12)
    else:
        assert math.isnan(cross)
    if ratios[0] >= 1 and be not in ("always",):
        assert "M=1" in note


def test_break_even_from_records():
    pts = points_frame(fx.records(fx.TINY))
    for metric in ("time_s", "energy_j"):
        vs = vs_reference(pts, metric)
        be = break_even(pts, metric)
        assert len(be) == vs.groupby(["layer", "series"]).ngroups
        for r in be.itertuples():
            g = vs[(vs["layer"] == r.layer) & (vs["series"] == r.series)].sort_values("m")
            ge = (g["ratio"] >= 1).tolist()
            if r.break_even == "always":
                assert all(ge)
            elif r.break_even == "never":
                assert not ge[-1]
            else:
                idx = g["m"].tolist().index(int(r.break_even))
                assert all(ge[idx:]) and not ge[idx - 1]


def test_ratios_recomputed():
    recs = fx.records(fx.TINY)
    vs = vs_reference(points_frame(recs), "time_s")
    t = {(r["layer"], r["m"], r["backend"]): r["time"]["median_s"] for r in recs
         if r["status"] == "ok"}
    for r in vs.itertuples():
        assert r.ratio == t[(r.layer, r.m, r.backend)] / t[(r.layer, r.m, "bf16")]
    assert "bnb-dequant" not in set(vs["backend"]) and "bf16" not in set(vs["backend"])


def test_byte_budget_from_records():
    recs = fx.records(fx.TINY)
    b = byte_budget(points_frame(recs), fx.BANDWIDTH)
    ok = [r for r in recs if r["status"] == "ok"]
    for row in b.itertuples():
        q = next(r for r in ok if r["layer"] == row.layer and r["backend"] == row.series)
        ref = next(r for r in ok if r["layer"] == row.layer and r["backend"] == "bf16")
        stored = q["traffic"]["weight"] + q["traffic"]["scales"]
        assert row.saved_bytes == ref["traffic"]["weight"] - stored
        assert row.saved_ideal_s == row.saved_bytes / fx.BANDWIDTH
        if row.series == "bnb-nf4":
            dq = next(r for r in ok if r["layer"] == row.layer and r["backend"] == "bnb-dequant")
            assert row.dequant_bytes == dq["traffic"]["total"]
            assert row.dequant_time_s == dq["time"]["median_s"]
            assert row.unfused_extra_bytes == dq["traffic"]["total"] + ref["traffic"]["weight"]
            assert row.unfused_from_m == min(r["m"] for r in ok if r["layer"] == row.layer
                                             and r["backend"] == "bnb-nf4" and any(
                                                 k["category"] == "dequant" for k in r["kernels"]))
        else:
            assert math.isnan(row.dequant_bytes)


def test_byte_budget_without_bf16_or_ceilings_uses_byte_model():
    recs = [r for r in fx.records(fx.TINY) if r["backend"] != "bf16"]
    b = byte_budget(points_frame(recs), None)
    r = b.iloc[0]
    q = next(x for x in recs if x["layer"] == r["layer"])
    assert r["bf16_weight_bytes"] == bf16_gemm(0, q["n"], q["k"]).weight
    assert math.isnan(r["saved_ideal_s"])


def test_value_at():
    ms, vs = [1, 4, 64], [2.0, 8.0, 100.0]
    assert value_at(ms, vs, 4).method == "measured" and value_at(ms, vs, 4).value == 8.0
    mid = value_at(ms, vs, 2)
    assert mid.method == "log-interpolated" and mid.value == pytest.approx(math.sqrt(2 * 8))
    assert mid.m_used == (1, 4) and "interpolated" in mid.how
    far = value_at(ms, vs, 2048)
    assert far.method == "nearest" and far.value == 100.0 and far.m_used == (64,)
    assert value_at([1], [float("nan")], 1) is None


def test_nearest_m():
    assert nearest_m([1, 16, 256, 2048], [1, 16, 256, 2048]) == [(1, 1), (16, 16), (256, 256),
                                                                   (2048, 2048)]
    assert nearest_m([1, 4, 32], [1, 16, 256, 2048]) == [(1, 1), (16, 32)]
