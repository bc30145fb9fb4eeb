"""The bench suites: they load, name real shapes and backends, and ci-smoke fits its budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from dqprof.gate.compare import load_side, run_json_for
from dqprof.kernels import DEFAULT_BACKENDS, backend_names, create
from dqprof.models.config import load_config
from dqprof.models.shapes import linear_shapes, select_shapes
from dqprof.results import point_key
from dqprof.sweep import DEFAULT_M, QUICK_M, SweepConfig, load_suite

BENCH = Path(__file__).resolve().parents[1] / "bench"
SECONDS_PER_POINT = 1.3  # an H200 point of the smoke suite with energy and attribution
SETUP_S = 15  # idle power, ceilings, quantizing each group's weights once
BUDGET_S = 150  # "about two minutes" with some slack


def suite(name: str) -> SweepConfig:
    return load_suite(BENCH / name, SweepConfig())


def smoke_keys(cfg: SweepConfig) -> list[str]:
    """The plan's keys without creating backends not registered yet (triton-nf4 lands later):
    those are taken to depend on M, which only overestimates the point count."""
    model = load_config(cfg.model)
    shapes = select_shapes(linear_shapes(model), cfg.shapes)
    keys = []
    for name in cfg.backends.split(","):
        once = name in backend_names() and create(name).m_independent
        for s in shapes:
            keys += [point_key(model.name, s.name, m, name) for m in ((0,) if once else cfg.m)]
    return keys


@pytest.mark.parametrize("name", ["ci-smoke.toml", "full.toml"])
def test_suite_loads_and_names_known_backends(name):
    cfg = suite(name)
    assert cfg.suite and cfg.suite["description"]
    assert set(cfg.backends.split(",")) <= set(DEFAULT_BACKENDS)
    assert not cfg.hot and cfg.energy


def test_ci_smoke_shapes_are_exact_names():
    cfg = suite("ci-smoke.toml")
    wanted = cfg.shapes.split(",")
    chosen = select_shapes(linear_shapes(load_config(cfg.model)), cfg.shapes)
    assert sorted(s.name for s in chosen) == sorted(wanted)  # no substring catches extra shapes
    portable = [b for b in DEFAULT_BACKENDS if not b.startswith("machete")]  # Hopper only
    assert cfg.m == QUICK_M and cfg.backends.split(",") == portable


def test_ci_smoke_fits_about_two_minutes():
    keys = smoke_keys(suite("ci-smoke.toml"))
    assert len(keys) == len(set(keys))
    assert SETUP_S + SECONDS_PER_POINT * len(keys) <= BUDGET_S, len(keys)


def test_full_is_the_default_sweep():
    cfg = suite("full.toml")
    assert cfg.shapes is None  # every shape
    assert cfg.m == DEFAULT_M and cfg.backends.split(",") == list(DEFAULT_BACKENDS)
    assert cfg.window_s == SweepConfig().window_s and cfg.repeats == SweepConfig().repeats


BASELINES = sorted((BENCH / "baselines").glob("*.jsonl")) or [
    pytest.param(None, marks=pytest.mark.skip(reason="no baseline committed yet: make one with "
                                              "`dqprof regress --update-baseline`"))]


@pytest.mark.parametrize("path", BASELINES, ids=lambda p: p.name if p else "none")
def test_committed_baselines_match_the_smoke_suite(path):
    side = load_side(path)
    assert run_json_for(path).exists(), "a baseline needs its <name>.run.json beside it"
    extra = set(side.records) - set(smoke_keys(suite("ci-smoke.toml")))
    assert not extra, f"baseline holds points ci-smoke does not run: {sorted(extra)[:3]}"
