"""Terminal tables keep every number whole at any width; --format csv|json|md parse back."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from dqprof.output import Col, Rows, col, emit, layout, text, to_csv, to_json, to_markdown

REPO = Path(__file__).resolve().parents[1]
PROFILE = str(REPO / "profiles" / "h200")
TINY = str(REPO / "tests" / "data" / "tiny-llama.json")


def dqprof(*args: str, columns: int | None = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("COLUMNS", None)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "dqprof", *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO)


def parse_md(out: str) -> list[list[str]]:
    lines = out.strip().splitlines()
    assert all(ln.startswith("| ") and ln.endswith(" |") for ln in [lines[0], *lines[2:]])
    assert set(lines[1]) <= set("|-:") and lines[1].count("|") == lines[0].count("|")
    rows = [[c.strip() for c in ln[2:-2].split(" | ")] for ln in [lines[0], *lines[2:]]]
    assert len({len(r) for r in rows}) == 1, "every row has the header's cell count"
    return rows


def check_formats(*args: str) -> list[dict]:
    """The command's json, csv and md agree on the rows; returns the json records."""
    as_json = dqprof(*args, "--format", "json")
    assert as_json.returncode in (0, 1), as_json.stderr
    records = json.loads(as_json.stdout)
    as_csv = dqprof(*args, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(rows) == len(records) > 0
    assert list(rows[0]) == list(records[0])
    for r, rec in zip(rows, records, strict=True):  # same values, empty for null
        assert all(r[k] == ("" if v is None else str(v)) for k, v in rec.items()
                   if not isinstance(v, float)), (r, rec)
        assert all(float(r[k]) == v for k, v in rec.items() if isinstance(v, float))
    md = parse_md(dqprof(*args, "--format", "md").stdout)
    assert len(md) == len(records) + 1
    return records


# -- the 80-column reconciliation table ----------------------------------------------------
@pytest.fixture(scope="module")
def reconcile_80() -> tuple[str, list[dict]]:
    args = ("model", "reconcile", PROFILE, "--kernels", PROFILE)
    res = dqprof(*args)
    assert res.returncode == 0, res.stderr
    return res.stdout, json.loads(dqprof(*args, "--format", "json").stdout)


def test_reconcile_at_80_columns_prints_every_number_whole(reconcile_80) -> None:
    out, records = reconcile_80
    assert "…" not in out
    lines = out.splitlines()
    assert max(len(ln.rstrip()) for ln in lines) <= 80
    rule = next(i for i, ln in enumerate(lines) if ln.startswith("───"))  # under the header
    body = [ln.split() for ln in lines[rule + 1:rule + 1 + len(records)]]
    assert len(body) == len(records)
    for cells, r in zip(body, records, strict=True):
        assert cells == [r["quant"], r["workload"], str(r["batch"]), r["phase"], str(r["m"]),
                         text(r["measured_j_per_token"]), text(r["predicted_j_per_token"]),
                         f"{r['explained_fraction']:.0%}", text(r["remainder_j_per_token"])]
    assert "left out at 80 columns: interp" in out  # the rest is one flag away
    wide = dqprof("model", "reconcile", PROFILE, "--kernels", PROFILE, "--wide").stdout
    assert all(r["interp"] in wide for r in records)


def test_reconcile_formats_parse_back(reconcile_80) -> None:
    records = check_formats("model", "reconcile", PROFILE, "--kernels", PROFILE)
    assert records == reconcile_80[1]
    assert {"measured_j_per_token", "explained_fraction", "interp"} <= set(records[0])
    # the committed run profiles its steps in situ: one document, the in-situ fields joined
    assert records[0]["in_situ_named_fraction"] >= 0.95


def test_narrow_terminal_stacks_rows_with_numbers_whole() -> None:
    res = dqprof("model", "reconcile", PROFILE, "--kernels", PROFILE, columns=40)
    assert res.returncode == 0 and "…" not in res.stdout
    assert max(len(ln.rstrip()) for ln in res.stdout.splitlines()) <= 40
    first = json.loads(dqprof("model", "reconcile", PROFILE, "--kernels", PROFILE,
                              "--format", "json").stdout)[0]
    block = res.stdout.split(f"\n{first['quant']}")[1]  # the first record's lines
    assert f"measured J/tok   {text(first['measured_j_per_token'])}" in block


# -- every table-printing command ------------------------------------------------------------
def test_shapes_formats() -> None:
    records = check_formats("shapes", "--model", TINY)
    assert {r["layer"] for r in records} >= {"mlp.down_proj", "lm_head"}
    assert all(isinstance(r["n"], int) and isinstance(r["quantized"], bool) for r in records)
    out = dqprof("shapes").stdout  # the bundled Gemma 4 at 80 columns
    assert "…" not in out and "262144" in out


def test_backends_formats() -> None:
    records = check_formats("backends")
    assert [r["name"] for r in records][:2] == ["bf16", "bnb-nf4"]
    assert all(r["origin"].startswith("dqprof.kernels.") for r in records)


def test_model_summary_formats() -> None:
    records = check_formats("model", "summary", PROFILE)
    bf16 = [r for r in records if r["quant"] == "bf16"]
    assert bf16 and all(r["j_vs_bf16"] == 1.0 for r in bf16)
    out = dqprof("model", "summary", PROFILE).stdout
    assert "…" not in out and max(len(ln.rstrip()) for ln in out.splitlines()) <= 80


def test_report_terminal_summary_formats(tmp_path: Path) -> None:
    args = ("report", PROFILE, "-o", str(tmp_path / "r"))
    res = dqprof(*args)
    assert res.returncode == 0 and "…" not in res.stdout
    assert "all linear layers per token, energy against bf16" in res.stdout
    records = json.loads(dqprof(*args, "--format", "json").stdout)
    bf16 = next(r["decode_b1_per_token"] for r in records if r["path"] == "bf16")
    shown = [r for r in records if r["decode_b1_per_token"] is not None]
    assert len(shown) > 2  # a path without the figure has none in json (no ratio either)
    for r in records:
        if r["decode_b1_per_token"] is None:
            assert r["decode_b1_vs_bf16"] is None
        else:
            assert r["decode_b1_vs_bf16"] == pytest.approx(r["decode_b1_per_token"] / bf16)
    md = parse_md(dqprof(*args, "--format", "md").stdout)
    assert md[0][0] == "path" and len(md) == len(records) + 1


def _regress_runs(tmp_path: Path) -> tuple[Path, Path]:
    lines = (REPO / "profiles" / "h200" / "kernels.jsonl").read_text().splitlines()[:12]
    base, cur = tmp_path / "base", tmp_path / "cur"
    for d in (base, cur):
        d.mkdir()
        shutil.copy(REPO / "profiles" / "h200" / "run.json", d)
    (base / "kernels.jsonl").write_text("\n".join(lines) + "\n")
    slow = json.loads(lines[0])
    slow["time"]["median_s"] *= 1.5  # a regression
    (cur / "kernels.jsonl").write_text("\n".join([json.dumps(slow), *lines[1:]]) + "\n")
    return base, cur


def test_regress_formats(tmp_path: Path) -> None:
    base, cur = _regress_runs(tmp_path)
    args = ("regress", "--baseline", str(base), "--current", str(cur), "--show-all")
    records = check_formats(*args)
    assert len(records) == 12
    slow = records[0]
    assert slow["verdict"] == "regression" and slow["time_change"] == pytest.approx(0.5)
    res = dqprof(*args)
    assert res.returncode == 1 and "…" not in res.stdout
    assert slow["point"] in res.stdout  # whole keys, at 80 columns too
    assert "FAIL" not in dqprof(*args, "--format", "csv").stdout.split("\n")[0]


def test_bad_format_is_one_line_exit_2() -> None:
    for args in (("shapes",), ("backends",), ("model", "summary", PROFILE)):
        res = dqprof(*args, "--format", "xml")
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert "--format takes table, csv, json, md" in res.stderr


# -- the layout itself ----------------------------------------------------------------------
def _rows() -> Rows:
    records = [{"name": f"path-{i}", "value": 1234567.0 / 7 ** i, "detail": "some words " * 4}
               for i in range(3)]
    cols = [col("name"), col("value", "a long header for a value", num=True, short="value"),
            col("detail", optional=True)]
    return Rows(["name", "value", "detail"], records, cols, "t")


def test_layout_steps_down_and_keeps_numbers() -> None:
    rows = _rows()
    assert layout(rows, None).left_out == []
    assert layout(rows, 200).headers == ["name", "a long header for a value", "detail"]
    narrow = layout(rows, 18)
    assert narrow.headers == ["name", "value"] and narrow.left_out[0].header == "detail"
    assert layout(rows, 10).stacked
    for width in (18, 30, 60):
        os.environ["COLUMNS"] = str(width)
        try:
            buf = io.StringIO()
            emit(rows, "table", Console(file=buf, width=width))
        finally:
            del os.environ["COLUMNS"]
        out = buf.getvalue()
        assert "…" not in out and all(text(r["value"]) in out for r in rows.records)
        assert max(len(ln.rstrip()) for ln in out.splitlines()) <= width


def test_machine_formats_keep_raw_values() -> None:
    rows = Rows(["a", "b"], [{"a": 1.23456789, "b": None}, {"a": float("nan"), "b": "x|y"}],
                [col("a", num=True), Col("b", lambda r: str(r["b"]))])
    assert json.loads(to_json(rows)) == [{"a": 1.23456789, "b": None}, {"a": None, "b": "x|y"}]
    assert list(csv.reader(io.StringIO(to_csv(rows)))) == [["a", "b"], ["1.23456789", ""],
                                                          ["nan", "x|y"]]
    assert to_markdown(rows).splitlines()[3] == "| – | x\\|y |"
