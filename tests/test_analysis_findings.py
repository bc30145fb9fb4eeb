"""Findings are sentences whose numbers are recomputed from the records."""

from __future__ import annotations

import analysis_fixtures as fx

from dqprof.analysis import fmt
from dqprof.analysis.breakdown import DECODE, per_token, totals
from dqprof.analysis.compute import analyze
from dqprof.analysis.findings import CANDIDATES, dequant_tax, findings
from dqprof.analysis.frame import points_frame


def test_three_findings_with_recomputed_numbers():
    recs = fx.records(fx.TINY)
    a = analyze(fx.make_run(recs))
    got = findings(a)
    assert len(got) == 3
    rows, _ = per_token(points_frame(recs), DECODE[0], "energy_j")
    t = totals(rows)["total"]
    decode = next(f for f in got if f.startswith("For decode, batch 1"))
    assert fmt.mj(t["bf16"]) in decode
    assert fmt.ratio(t["bnb-nf4"] / t["bf16"]) in decode


def test_dequant_tax_sentence_matches_attribution():
    recs = fx.records(fx.TINY)
    a = analyze(fx.make_run(recs))
    text = dequant_tax(a)
    layer = a.tax_layer
    assert text.startswith(f"On {layer}")
    m = int(text.split(" at M=")[1].split(" ")[0])
    r = next(x for x in recs if x["layer"] == layer and x["backend"] == "bnb-nf4"
             and x["m"] == m)
    dq = sum(k["time_s"] for k in r["kernels"] if k["category"] == "dequant")
    assert fmt.pct(dq / sum(k["time_s"] for k in r["kernels"])) in text
    assert "estimated from bnb-dequant" in text


def test_cpu_run_still_has_three_time_findings():
    recs, info = fx.cpu_like()
    a = analyze(fx.make_run(recs, info))
    got = findings(a)
    assert len(got) == 3 and not any("energy" in f for f in got)
    assert all(f(a) is None for f in CANDIDATES if f.__name__ in ("dequant_tax", "energy_fit",
                                                                   "byte_budget"))
