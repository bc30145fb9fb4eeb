"""`dqprof report`: the output folder, its numbers, bad input, and the committed profile."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import analysis_fixtures as fx
import pytest

from dqprof.analysis import fmt
from dqprof.analysis.breakdown import DECODE, PREFILL, per_token, totals
from dqprof.analysis.frame import points_frame
from dqprof.analysis.report import make_report

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "h200" / "kernels.jsonl"


def _cli(argv: list[str], monkeypatch, cwd: Path | None = None) -> int:
    from dqprof.cli import main

    monkeypatch.setattr(sys, "argv", ["dqprof", *argv])
    if cwd is not None:
        monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code or 0


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    base = tmp_path_factory.mktemp("full")
    recs = fx.records(fx.TINY)
    run = fx.write_run(base / "run", recs)
    return recs, make_report([run], base / "out")


def test_output_folder(full):
    _, res = full
    out = res.out
    names = {p.name for p in out.iterdir()}
    for plot in ("roofline", "energy_roofline", "time_vs_m", "energy_vs_m", "tax",
                 "per_token_energy", "per_token_time"):
        assert {f"{plot}.png", f"{plot}.svg"} <= names
    assert {"report.html", "summary.md"} <= names
    assert all(p.exists() for p in res.files)


def test_html_is_self_contained(full):
    _, res = full
    html = (res.out / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|[^"'>]*\.(png|svg|css|js))""", html)
    pngs = len(list(res.out.glob("*.png")))
    assert html.count("data:image/png;base64,") == pngs


def test_summary_numbers_are_recomputed(full):
    recs, res = full
    md = (res.out / "summary.md").read_text()
    pts = points_frame(recs)
    for metric in ("energy_j", "time_s"):
        unit = fmt.mj if metric == "energy_j" else fmt.us
        for sc in (DECODE[0], DECODE[-1], PREFILL[-1]):
            t = totals(per_token(pts, sc, metric)[0])["total"]
            for s in t.index:
                assert f"{unit(t[s])} ({fmt.ratio(t[s] / t['bf16'])})" in md
    findings = md.split("## Findings")[1].split("##")[0]
    assert len(re.findall(r"^\d\. ", findings, re.M)) == 3
    assert "## Left out\n\nNothing" in md  # a run without triton-nf4 loses nothing else
    assert "lm_head: bf16 record used" in md
    assert "No split: this run lacks triton-nf4." in md


def test_cpu_run_renders_what_it_can(tmp_path):
    recs, info = fx.cpu_like()
    res = make_report([fx.write_run(tmp_path / "run", recs, info)], tmp_path / "out")
    names = {p.name for p in res.out.iterdir()}
    assert "roofline.png" in names and "time_vs_m.svg" in names
    assert not any(n.startswith(("energy", "tax", "per_token_energy")) for n in names)
    left = " ".join(res.left_out)
    assert "energy" in left and "kernel attribution" in left and "ceilings" in left
    md = (res.out / "summary.md").read_text()
    assert "## Left out" in md and "no record of run has an energy figure" in md
    assert "no record of run has an energy figure" in (res.out / "report.html").read_text()


def test_comparison_with_a_missing_backend(tmp_path):
    shapes = "attn.o_proj,mlp.down_proj"  # two layers: quick to plot twice
    a = fx.write_run(tmp_path / "a", fx.records(fx.TINY, shapes=shapes))
    b = fx.write_run(tmp_path / "b", fx.records(fx.TINY, shapes=shapes, time_scale=1.1,
                                                backends=("bf16", "bnb-nf4", "bnb-dequant")))
    res = make_report([a, b], tmp_path / "cmp")
    names = {p.name for p in res.out.iterdir()}
    assert {"comparison.csv", "compare_time.png", "compare_energy.svg", "a-roofline.png",
            "b-tax.png"} <= names
    assert any("marlin-gptq: in a, missing from b" in x for x in res.left_out)
    md = (res.out / "summary.md").read_text()
    assert "marlin-gptq: in a, missing from b" in md.split("## Left out")[1]
    bf16_points = len(fx.records(fx.TINY, shapes=shapes, backends=("bf16",)))
    assert f"| b | bf16 | {bf16_points} | {fmt.ratio(1.1)} |" in md


def test_cli_without_argument_reads_the_default_profile(tmp_path, monkeypatch):
    import dqprof.analysis.report as report

    run = fx.write_run(tmp_path / "run", *fx.cpu_like())
    monkeypatch.setattr(report, "default_profile", lambda: run)
    assert _cli(["report", "-o", str(tmp_path / "out")], monkeypatch) == 0
    assert (tmp_path / "out" / "report.html").exists()
    assert f"Run `{run}`" in (tmp_path / "out" / "summary.md").read_text()


def test_cli_without_argument_and_no_profile(tmp_path, monkeypatch, capsys):
    import dqprof.analysis.report as report

    monkeypatch.setattr(report, "default_profile", lambda: tmp_path / "none")
    assert _cli(["report", "-o", str(tmp_path / "out")], monkeypatch) == 2
    assert "no committed profile" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["no_kernels", "schema", "no_common"])
def test_cli_bad_input_exits_2(case, tmp_path, monkeypatch, capsys):
    args = []
    if case == "no_kernels":
        (tmp_path / "run").mkdir()
        args, expect = [str(tmp_path / "run")], "kernels.jsonl"
    elif case == "schema":
        recs = fx.records(fx.TINY, backends=("bf16",))
        recs[0]["schema"] = 0
        args, expect = [str(fx.write_run(tmp_path / "run", recs))], "schema version 0"
    else:
        a = fx.write_run(tmp_path / "a", fx.records(fx.TINY, backends=("bf16",), ms=(1,)))
        b = fx.write_run(tmp_path / "b", fx.records(fx.TINY, backends=("bf16",), ms=(16,)))
        args, expect = [str(a), str(b)], "no ok point in common"
    assert _cli(["report", *args, "-o", str(tmp_path / "out")], monkeypatch) == 2
    assert expect in " ".join(capsys.readouterr().err.split())


@pytest.mark.skipif(not PROFILE.exists(), reason="profiles/h200/kernels.jsonl not committed yet")
def test_default_report_reads_the_committed_profile(tmp_path, monkeypatch):
    assert _cli(["report", "-o", str(tmp_path / "report")], monkeypatch, cwd=REPO) == 0
    out = tmp_path / "report"
    assert (out / "report.html").exists() and (out / "summary.md").exists()
    assert list(out.glob("*.png")) and list(out.glob("*.svg"))
    md = (out / "summary.md").read_text()
    assert "## Findings" in md
    # the format-or-path section builds on the committed profile, its numbers recomputed
    assert {"format_path.png", "format_path.svg", "format_path.csv"} <= {
        p.name for p in out.iterdir()}
    section = md.split("## Format or path")[1].split("\n## ")[0]
    from dqprof.analysis import format_path as fp
    from dqprof.analysis.frame import load_run

    pts = load_run(REPO / "profiles" / "h200").points
    fused = fp.roles_of(pts).fused
    checked = 0
    for metric, unit in (("time_s", fmt.us), ("energy_j", fmt.mj)):
        for sc in DECODE:
            t = totals(per_token(pts, sc, metric)[0])["total"]
            if "bnb-nf4" not in t or fused not in t:  # left out (a figure missing): said so
                assert f"| {sc.label} | – |" in section or f"| {sc.label} | " in section
                continue
            int4 = t[[s for s in t.index if s.startswith(("marlin", "machete", "tinygemm",
                                                          "gemlite"))]]
            best = int4.idxmin()
            gap, path = t["bnb-nf4"] - int4[best], t["bnb-nf4"] - t[fused]
            row = (f"| {sc.label} | {unit(t['bnb-nf4'])} | {unit(t[fused])} | "
                   f"{best}: {unit(int4[best])} | {unit(gap)} | {unit(path)} "
                   f"({fmt.pct(path / gap)}) |")
            assert row in section
            checked += 1
    assert checked >= 3
    assert "### Full model in vLLM (J/token)" in section  # model.jsonl is committed too
