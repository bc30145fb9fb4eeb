"""Backends from other packages: the ``dqprof.backends`` entry-point group.

The example package (tests/data/example_backend) is made installed the way pip would leave
it for the interpreter: a ``.dist-info`` folder with ``entry_points.txt`` on sys.path (no pip
install into the environment), in a subprocess so this process's registry stays as it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "tests" / "data" / "example_backend"
TINY = str(REPO / "tests" / "data" / "tiny-llama.json")
CLASH = '''
from dqprof.kernels.bf16 import Bf16


class NotBf16(Bf16):
    description = "a plugin that wants the built-in path's name"
'''


def _dist(site: Path, name: str, entry_points: str) -> None:
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[dqprof.backends]\n{entry_points}\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    _dist(site, "dqprof-example-backend",
          "example-int8 = dqprof_example_backend:ExampleInt8")
    (site / "clash_plugin.py").write_text(CLASH)
    _dist(site, "broken-plugins", "missing = no_such_module:Backend\n"
                                  "clash = clash_plugin:NotBf16\n"
                                  "nothing = json")
    return site


def dqprof(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(EXAMPLE), str(REPO)]),
           "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "dqprof", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_backends_lists_the_plugin_and_why_others_failed(site: Path) -> None:
    res = dqprof(site, "backends", "--format", "json")
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    ex = rows["example-int8"]
    assert ex["loaded"] and ex["here"] == "ok"
    assert ex["origin"] == ("entry point example-int8 = dqprof_example_backend:ExampleInt8 "
                            "(dqprof-example-backend 0.1.0)")
    assert rows["bf16"]["origin"] == "dqprof.kernels.bf16"  # not replaced by the clash
    assert rows["missing"]["here"].startswith("not loaded: import failed: ModuleNotFoundError")
    assert "name 'bf16' is taken by dqprof.kernels.bf16" in rows["clash"]["here"]
    assert "registers no backend" in rows["nothing"]["here"]
    assert not (rows["missing"]["loaded"] or rows["clash"]["loaded"])
    table = dqprof(site, "backends", "--wide")  # the terminal table says the same
    assert "example-int8" in table.stdout and "not loaded: import failed" in table.stdout


def test_the_plugin_is_swept_on_cpu(site: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = dqprof(site, "bench", "--device", "cpu", "--model", TINY, "--backends",
                 "example-int8,bf16", "--shapes", "down_proj", "--m", "1,8", "--repeats", "2",
                 "--l2-factor", "0.02", "-o", str(run))
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in (run / "kernels.jsonl").read_text().splitlines()]
    mine = [r for r in recs if r["backend"] == "example-int8"]
    assert [r["m"] for r in mine] == [1, 8]
    assert all(r["status"] == "ok" and r["rel_err"] < 2e-2 and r["time"]["median_s"] > 0
               for r in mine), mine
    assert mine[0]["traffic"]["weight"] == mine[0]["n"] * mine[0]["k"]  # its own byte model


def test_an_unknown_backend_still_names_the_plugin(site: Path) -> None:
    res = dqprof(site, "bench", "--device", "cpu", "--model", TINY, "--backends", "nope")
    assert res.returncode == 2
    assert "example-int8" in res.stderr and res.stderr.count("\n") == 1
