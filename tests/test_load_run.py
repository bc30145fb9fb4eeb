"""dqprof.load_run: a run folder as one flat DataFrame with documented columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dqprof
from dqprof.errors import DqprofError
from dqprof.load import COLUMNS, INTS

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "h200"


@pytest.fixture(scope="module")
def df():
    return dqprof.load_run(PROFILE)


def test_columns_are_the_documented_ones_and_flat(df) -> None:
    assert list(df.columns) == list(COLUMNS)
    assert all(COLUMNS[c] for c in df.columns)
    for c in df.columns:  # flat: scalars only, no lists or dicts
        assert not df[c].map(lambda v: isinstance(v, list | dict | tuple)).any(), c
    assert all(str(df[c].dtype) == "Int64" for c in INTS)


def test_kernel_and_model_rows(df) -> None:
    kernels = [json.loads(x) for x in (PROFILE / "kernels.jsonl").read_text().splitlines()]
    models = [json.loads(x) for x in (PROFILE / "model.jsonl").read_text().splitlines()]
    assert df["kind"].value_counts().to_dict() == {"kernel": len(kernels), "model": len(models)}
    k = df[df["kind"] == "kernel"].iloc[0]
    assert (k["key"], k["m"], k["time_s"]) == (kernels[0]["key"], kernels[0]["m"],
                                               kernels[0]["time"]["median_s"])
    assert k["kernel_gemm_s"] == pytest.approx(sum(x["time_s"] for x in kernels[0]["kernels"]
                                                   if x["category"] == "gemm"))
    assert k["gpu"] == "NVIDIA H200"
    m = df[df["kind"] == "model"].iloc[0]
    assert (m["quant"], m["batch"], m["decode_j_per_token"]) == (
        models[0]["quant"], models[0]["batch"], models[0]["decode"]["j_per_token"])
    assert df.attrs["run"]["environment"]["gpu"]["name"] == "NVIDIA H200"


def test_kind_and_files(tmp_path: Path) -> None:
    only = dqprof.load_run(PROFILE, kind="model")
    assert set(only["kind"]) == {"model"} and list(only.columns) == list(COLUMNS)
    one = dqprof.load_run(PROFILE / "kernels.jsonl")
    assert set(one["kind"]) == {"kernel"}
    for bad in (tmp_path / "nope", tmp_path):
        with pytest.raises(DqprofError):
            dqprof.load_run(bad)
    with pytest.raises(DqprofError, match="kind"):
        dqprof.load_run(PROFILE, kind="kernels")
