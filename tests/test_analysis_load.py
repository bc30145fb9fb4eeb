"""Loading run folders: bad input is a clear DqprofError (exit 2)."""

from __future__ import annotations

import json
import math

import pytest
from analysis_fixtures import TINY, records, run_info, write_run

from dqprof.analysis.frame import load_run, load_runs, notebook_run_dir, series_order
from dqprof.errors import DqprofError


def test_folder_without_kernels_jsonl(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(run_info()))
    with pytest.raises(DqprofError, match="kernels.jsonl") as e:
        load_run(tmp_path)
    assert e.value.exit_code == 2


def test_missing_folder(tmp_path):
    with pytest.raises(DqprofError, match="no such run folder"):
        load_run(tmp_path / "nope")


def test_run_json_of_another_schema(tmp_path):
    write_run(tmp_path, records(TINY), {**run_info(), "schema": 99})
    with pytest.raises(DqprofError, match="schema version 99"):
        load_run(tmp_path)


def test_record_of_another_schema(tmp_path):
    recs = records(TINY)
    recs[3]["schema"] = 99
    write_run(tmp_path, recs)
    with pytest.raises(DqprofError, match="kernels.jsonl:4: schema version 99"):
        load_run(tmp_path)


def test_empty_results(tmp_path):
    write_run(tmp_path, [])
    with pytest.raises(DqprofError, match="no records"):
        load_run(tmp_path)


def test_points_and_order(tmp_path):
    recs = records(TINY)
    run = load_run(write_run(tmp_path, recs))
    assert len(run.points) == len(recs)
    assert series_order(run.points)[0] == "bf16"
    ok = [r for r in recs if r["status"] == "ok"]
    assert run.ok["time_s"].tolist() == [r["time"]["median_s"] for r in ok]
    assert run.ok["energy_j"].tolist() == [r["energy"]["j_per_call"] for r in ok]
    assert run.has_energy and run.has_kernels


def test_unusable_energy_is_dropped_and_noted(tmp_path):
    recs = records(TINY)
    recs[0]["energy"]["flag"] = "implausible: power below idle"
    recs[1]["energy"]["flag"] = "few counter ticks (3)"  # doubtful, kept
    run = load_run(write_run(tmp_path, recs))
    assert math.isnan(run.points["energy_j"].iloc[0])
    assert run.points["energy_j"].iloc[1] == recs[1]["energy"]["j_per_call"]
    assert any("implausible" in n for n in run.notes)


def test_labels_disambiguated(tmp_path):
    a = write_run(tmp_path / "x" / "run", records(TINY))
    b = write_run(tmp_path / "y" / "run", records(TINY))
    assert [r.label for r in load_runs([a, b])] == ["x/run", "y/run"]


def test_notebook_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DQPROF_RUN", str(write_run(tmp_path, records(TINY))))
    assert notebook_run_dir() == tmp_path
    monkeypatch.setenv("DQPROF_RUN", str(tmp_path / "empty"))
    with pytest.raises(DqprofError, match="DQPROF_RUN"):
        notebook_run_dir()
