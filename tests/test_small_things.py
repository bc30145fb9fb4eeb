"""Small fixes: requires-python, coinciding lines in time_vs_m, synth's order, bench's ETA."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd

from dqprof.eta import Eta, duration

REPO = Path(__file__).resolve().parents[1]


def test_requires_python_matches_ruff_and_tomllib() -> None:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert cfg["project"]["requires-python"] == ">=3.11"  # tomllib is 3.11's
    assert cfg["tool"]["ruff"]["target-version"] == "py311"
    assert sys.version_info >= (3, 11)


def test_coinciding_paths_stay_distinguishable() -> None:
    from dqprof.analysis.plots import line_styles, per_shape

    series = ["bf16", "marlin-gptq", "marlin-awq", "machete-gptq", "machete-awq", "bnb-nf4"]
    rows = [{"layer": "l", "series": s, "status": "ok", "m": m, "time_s": 1e-5 * m}
            for s in series for m in (1, 16, 256)]  # every path on the same line
    fig = per_shape(pd.DataFrame(rows), "time_s", series)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    looks = {(ln.get_marker(), ln.get_linestyle()) for lab, ln in lines.items()
             if not lab.endswith("(reference)")}
    assert len(looks) == len(series) - 1
    assert len(set(line_styles([f"p{i}" for i in range(30)]).values())) == 30


def test_synth_checks_name_and_format_before_its_bar(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["nosuchmodel"], ["gemma-4-e4b", "--format", "int3"]):
        res = subprocess.run([sys.executable, "-m", "dqprof", "model", "synth", *args, "-o",
                              str(tmp_path / "ck")], capture_output=True, text=True, env=env)
        assert res.returncode == 2
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
        assert "tensors" not in res.stderr and not (tmp_path / "ck").exists()


def test_eta_counts_down_from_the_pace_of_measured_points() -> None:
    now = [0.0]
    eta = Eta(4, clock=lambda: now[0])
    assert eta.text() == "ETA after 2 points"
    now[0] = 30.0
    eta.advance()  # the first point: setup and warm-up, not pace
    eta.advance(0)  # a skipped point costs nothing
    now[0] = 40.0
    eta.advance()
    assert eta.remaining_s() == 20.0  # 2 points left at 10 s each
    now[0] = 45.0
    assert eta.text() == "ETA 15s"
    assert duration(3725) == "1h 02m" and duration(200) == "3m 20s"


def test_bench_weights_skipped_points_zero(tmp_path: Path) -> None:
    from dqprof.cli import _point_weights
    from dqprof.sweep import Sweep, SweepConfig

    cfg = SweepConfig(model=str(REPO / "tests" / "data" / "tiny-llama.json"),
                      shapes="down_proj", m=(1, 8), backends="bf16,marlin-gptq", device="cpu")
    sweep = Sweep(cfg, tmp_path / "run")
    assert _point_weights(sweep, None, False) == [1.0, 1.0, 0.0, 0.0]  # marlin: cuda only


def test_source_digest_names_the_code_not_the_checkout(tmp_path) -> None:
    import shutil

    from dqprof.measure.environment import source_digest

    pkg = Path(__file__).resolve().parents[1] / "dqprof"
    copy = tmp_path / "dqprof"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(copy) == source_digest(pkg) == source_digest()  # where it sits: no
    (copy / "sweep.py").write_text((copy / "sweep.py").read_text() + "\n# one more line\n")
    assert source_digest(copy) != source_digest(pkg)
