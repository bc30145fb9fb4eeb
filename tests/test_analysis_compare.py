"""Comparing runs aligned by (layer, M, backend, variant)."""

from __future__ import annotations

import analysis_fixtures as fx
import numpy as np
import pytest

from dqprof.analysis.compare import align, ratio_by_m, ratio_summary
from dqprof.errors import DqprofError


def _runs(scale=1.25, backends_b=fx.BACKENDS):
    a = fx.make_run(fx.records(fx.TINY), label="a")
    b = fx.make_run(fx.records(fx.TINY, backends=backends_b, time_scale=scale), label="b")
    return a, b


def test_ratios_recomputed_from_records():
    a, b = _runs()
    aligned, notes = align([a, b])
    assert not [n for n in notes if "missing" in n]
    ta = {(r["layer"], r["m"], r["backend"]): r["time"]["median_s"] for r in a.records
          if r["status"] == "ok"}
    tb = {(r["layer"], r["m"], r["backend"]): r["time"]["median_s"] for r in b.records
          if r["status"] == "ok"}
    assert len(aligned) == len(ta)
    for r in aligned.itertuples():
        key = (r.layer, r.m, r.backend)
        assert r.time_s_ratio == tb[key] / ta[key]
    s = ratio_summary(aligned)
    for r in s.itertuples():
        x = aligned[aligned["series"] == r.series]["time_s_ratio"]
        assert r.time_ratio == pytest.approx(float(np.exp(np.log(x).mean())))
    assert set(ratio_by_m(aligned, "energy_j")["m"]) == set(aligned["m"])


def test_backend_missing_from_one_run_is_listed():
    a, b = _runs(backends_b=("bf16", "bnb-nf4"))
    aligned, notes = align([a, b])
    assert "marlin-gptq" not in set(aligned["series"])
    assert any(n.startswith("marlin-gptq: in a, missing from b") for n in notes)


def test_no_common_points_is_fatal():
    a = fx.make_run(fx.records(fx.TINY, ms=(1, 16)), label="a")
    b = fx.make_run(fx.records(fx.TINY, ms=(256,), backends=("bf16", "bnb-nf4")), label="b")
    with pytest.raises(DqprofError, match="no ok point in common") as e:
        align([a, b])
    assert e.value.exit_code == 2


def test_one_run_is_not_a_comparison():
    with pytest.raises(DqprofError, match="two or more"):
        align([_runs()[0]])
