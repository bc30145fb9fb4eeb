"""Energy per kernel category and the energy-roofline fit."""

from __future__ import annotations

import math

import analysis_fixtures as fx
import pytest

from dqprof.analysis.energy import category_frame, fit_energy, split_call
from dqprof.analysis.frame import points_frame
from dqprof.measure.attribution import by_category

KERNELS = [{"name": "kDequantizeBlockwise", "category": "dequant", "time_s": 3e-6, "count": 1},
           {"name": "nvjet_gemm", "category": "gemm", "time_s": 6e-6, "count": 1},
           {"name": "copy", "category": "cast/copy", "time_s": 1e-6, "count": 1}]


def test_time_share_split():
    e = 0.01
    s = split_call(e, KERNELS)
    cat = by_category(KERNELS)
    total = sum(cat.values())
    for c, t in cat.items():
        assert s.joules[c] == pytest.approx(e * t / total)
    assert sum(s.joules.values()) == pytest.approx(e)
    assert s.estimated == ()


def test_dequant_from_metered_energy():
    e, dq = 0.01, 0.004
    s = split_call(e, KERNELS, dequant_j=dq)
    assert s.joules["dequant"] == dq and s.estimated == ("dequant",)
    cat = by_category(KERNELS)
    rest = sum(t for c, t in cat.items() if c != "dequant")
    assert s.joules["gemm"] == pytest.approx((e - dq) * cat["gemm"] / rest)
    assert sum(s.joules.values()) == pytest.approx(e)


def test_metered_dequant_is_clipped_to_the_call():
    s = split_call(0.001, KERNELS, dequant_j=0.002)
    assert s.joules["dequant"] == 0.001 and s.clipped
    assert sum(s.joules.values()) == pytest.approx(0.001)


def test_no_dequant_kernel_ignores_metered_energy():
    fused = [k for k in KERNELS if k["category"] != "dequant"]
    s = split_call(0.01, fused, dequant_j=0.004)
    assert s.method == "time share" and "dequant" not in s.estimated


def test_unknown_category_counts_as_other():
    s = split_call(1.0, [{"name": "x", "category": "new", "time_s": 1.0, "count": 1}])
    assert s.joules["other"] == 1.0


def test_without_kernels_all_unattributed():
    assert split_call(0.5, None).joules == {"unattributed": 0.5}


def test_category_frame_uses_bnb_dequant_record():
    recs = fx.records(fx.TINY)
    cats = category_frame(points_frame(recs))
    dequant_j = {r["layer"]: r["energy"]["j_per_call"] for r in recs
                 if r["backend"] == "bnb-dequant" and r["status"] == "ok"}
    nf4 = cats[(cats["backend"] == "bnb-nf4") & (cats["category"] == "dequant")]
    with_dq = nf4[nf4["time_s"] > 0]
    assert len(with_dq) > 0
    for r in with_dq.itertuples():
        assert r.energy_j == min(dequant_j[r.layer], r.call_energy_j)
        assert r.estimated
    # every call's categories add up to its measured energy
    sums = cats.groupby(["layer", "m", "series"]).agg(e=("energy_j", "sum"),
                                                      call=("call_energy_j", "first"))
    assert (abs(sums["e"] - sums["call"]) <= 1e-12 * sums["call"]).all()


def test_fit_recovers_the_cost_model():
    fit = fit_energy(points_frame(fx.records(fx.TINY)))
    assert fit.j_per_byte == pytest.approx(fx.J_PER_BYTE, rel=1e-6)
    assert fit.j_per_flop == pytest.approx(fx.J_PER_FLOP, rel=1e-6)
    assert fit.balance == pytest.approx(fx.J_PER_BYTE / fx.J_PER_FLOP, rel=1e-6)


def test_fit_needs_energy():
    recs, _ = fx.cpu_like()
    assert fit_energy(points_frame(recs)) is None
    assert math.isnan(points_frame(recs)["energy_j"].max())
