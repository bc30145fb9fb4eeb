"""The GitHub workflows: their structure, and that every dqprof command they run exists with
the options they pass (so a renamed flag fails here, not on the GPU runner)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from dqprof.cli import app

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it is in the test extra: "
                                          "pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def load(name: str) -> dict[str, Any]:
    wf = yaml.safe_load((WORKFLOWS / name).read_text())
    wf["on"] = wf.pop(True, wf.get("on"))  # YAML 1.1 reads the key `on` as true
    return wf


def only_job(wf: dict[str, Any]) -> dict[str, Any]:
    (job,) = wf["jobs"].values()
    return job


def step(job: dict[str, Any], text: str) -> dict[str, Any]:
    """The one step whose `uses` or `run` mentions ``text``."""
    found = [s for s in job["steps"] if text in s.get("uses", "") + s.get("run", "")]
    assert len(found) == 1, f"expected one step with '{text}', found {len(found)}"
    return found[0]


def dqprof_calls(job: dict[str, Any]) -> list[list[str]]:
    """Every `dqprof ...` command line the job runs, env variables filled in, split like sh."""
    calls = []
    for s in job["steps"]:
        script = s.get("run", "").replace("\\\n", " ")
        for name, value in (job.get("env") or {}).items():
            script = re.sub(rf"\$\{{?{name}\}}?", str(value), script)
        for line in script.splitlines():
            words = shlex.split(line.split(" | ")[0], comments=True)
            if words[:1] == ["dqprof"]:
                calls.append(words[1:])
    return calls


def check_options(args: list[str]) -> None:
    group = typer.main.get_command(app)
    command = group.commands.get(args[0])  # type: ignore[attr-defined]
    if command is None:
        pytest.skip(f"`dqprof {args[0]}` is not in this checkout yet")
    known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    used = {a.split("=")[0] for a in args[1:] if a.startswith("-")}
    assert used <= known, f"dqprof {args[0]} has no option {sorted(used - known)}"


def test_gpu_workflow_triggers_and_runner():
    wf = load("gpu-kernel-regression.yml")
    assert "pull_request" in wf["on"] and wf["on"]["schedule"][0]["cron"]
    job = only_job(wf)
    assert set(job["runs-on"]) == {"self-hosted", "gpu"}
    assert all("@v" in s["uses"] for s in job["steps"] if "uses" in s)


def test_gpu_workflow_caches_the_venv_on_pyproject():
    job = only_job(load("gpu-kernel-regression.yml"))
    cache = step(job, "actions/cache")
    assert cache["with"]["path"] == ".venv"
    assert "hashFiles('pyproject.toml')" in cache["with"]["key"]
    assert 'pip install -e ".[gpu,vllm]"' in step(job, "pip install -e")["run"]


def test_gpu_workflow_runs_the_smoke_suite_and_gates_it():
    job = only_job(load("gpu-kernel-regression.yml"))
    calls = {c[0]: c for c in dqprof_calls(job)}
    assert {"env", "bench", "regress", "report"} <= set(calls)
    bench = calls["bench"]
    suite = bench[bench.index("--suite") + 1]
    assert suite == "bench/ci-smoke.toml" and (ROOT / suite).exists()
    out = bench[bench.index("-o") + 1]
    regress = calls["regress"]
    assert regress[regress.index("--current") + 1] == out
    assert regress[regress.index("--baseline") + 1].startswith("bench/baselines/")
    assert {"--junit", "--summary", "--max-slowdown", "--max-energy-increase"} <= set(regress)
    report = calls["report"]
    assert report[1] == out and report[report.index("-o") + 1] == "report-pr"


@pytest.mark.parametrize("command", ["env", "bench", "regress", "report"])
def test_gpu_workflow_commands_exist_with_their_options(command):
    calls = {c[0]: c for c in dqprof_calls(only_job(load("gpu-kernel-regression.yml")))}
    check_options(calls[command])


def test_gpu_workflow_publishes_whatever_happened():
    job = only_job(load("gpu-kernel-regression.yml"))
    summary = step(job, "GITHUB_STEP_SUMMARY")
    assert "always()" in summary["if"] and "summary.md" in summary["run"]
    upload = step(job, "actions/upload-artifact")
    assert "always()" in upload["if"]
    paths = upload["with"]["path"].split()
    assert {"runs/pr", "junit.xml", "report-pr"} <= set(paths)
    assert "always()" in step(job, "dqprof report")["if"]


def test_cpu_workflow_runs_ci_script_on_python_311():
    wf = load("cpu-tests.yml")
    job = only_job(wf)
    assert job["runs-on"] == "ubuntu-latest"
    assert "pull_request" in wf["on"]
    assert step(job, "setup-python")["with"]["python-version"] == "3.11"  # a string, not 3.11
    assert step(job, ".ci/run")["run"].strip() == "bash .ci/run"
