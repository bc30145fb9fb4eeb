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


# -- the sharded sweep: a GitHub Actions matrix and a SLURM array, both ending in merge ------

def matrix_calls(wf: dict[str, Any], job: str) -> list[list[str]]:
    """dqprof calls of one job, the workflow's env and the first matrix value filled in."""
    spec = dict(wf["jobs"][job])
    env = {**(wf.get("env") or {}), **(spec.get("env") or {})}
    for name, values in ((spec.get("strategy") or {}).get("matrix") or {}).items():
        env[f"{{ matrix.{name} }}"] = values[0]
    for s in spec["steps"]:
        if "run" in s:
            s["run"] = s["run"].replace("${{ matrix.shard }}", str(env.get("{ matrix.shard }")))
    spec["env"] = {k: v for k, v in env.items() if not k.startswith("{")}
    return dqprof_calls(spec)


def test_matrix_workflow_shards_one_plan_then_merges_and_gates():
    wf = load("gpu-sweep-matrix.yml")
    shard_job, final = wf["jobs"]["shard"], wf["jobs"]["merge-and-gate"]
    shards = shard_job["strategy"]["matrix"]["shard"]
    assert shards == list(range(1, int(wf["env"]["SHARDS"]) + 1))
    assert shard_job["strategy"]["fail-fast"] is False
    assert final["needs"] == "shard" and "always()" in final["if"]
    (bench,) = matrix_calls(wf, "shard")
    assert bench[0] == "bench" and bench[bench.index("--shard") + 1] == f"1/{len(shards)}"
    assert (ROOT / bench[bench.index("--suite") + 1]).exists()
    upload = step(shard_job, "actions/upload-artifact")
    assert upload["with"]["path"] == "runs/shard-${{ matrix.shard }}"
    assert step(final, "actions/download-artifact")["with"]["pattern"] == "shard-*"
    merge, regress = matrix_calls(wf, "merge-and-gate")
    assert merge[0] == "merge" and merge[1] == "runs/shard-*"
    out = merge[merge.index("-o") + 1]
    assert regress[0] == "regress" and regress[regress.index("--current") + 1] == out
    assert (ROOT / regress[regress.index("--baseline") + 1]).exists()
    for call in (bench, merge, regress):
        check_options(call)
    assert all("@v" in s["uses"] for j in wf["jobs"].values() for s in j["steps"] if "uses" in s)


SLURM = ROOT / "bench" / "slurm" / "sweep-array.sh"


def slurm_calls() -> list[list[str]]:
    calls = []
    for line in SLURM.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("dqprof "):
            calls.append(shlex.split(line)[1:])
    return calls


def test_slurm_array_script_parses_and_ends_in_merge():
    import subprocess

    assert subprocess.run(["bash", "-n", str(SLURM)]).returncode == 0
    text = SLURM.read_text()
    assert "--array=1-" in text and "--dependency=afterany:" in text
    calls = slurm_calls()
    assert [c[0] for c in calls] == ["merge", "regress", "bench"]
    merge, regress, bench = calls
    assert bench[bench.index("--shard") + 1] == "$SLURM_ARRAY_TASK_ID/$SHARDS"
    assert merge[1] == '$OUT/shard-*' or merge[1].endswith("/shard-*")
    assert regress[regress.index("--current") + 1] == merge[merge.index("-o") + 1]
    for call in calls:
        check_options(call)


def test_slurm_array_script_submits_an_array_and_its_merge(tmp_path):
    """Run the submitting half with a fake sbatch: what it would hand to SLURM."""
    import os
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "sbatch.log"
    (fake / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {log}\necho 4242\n')
    (fake / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SHARDS": "3",
           "OUT": str(tmp_path / "out")}
    env.pop("SLURM_ARRAY_TASK_ID", None)
    res = subprocess.run(["bash", str(SLURM)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    array, merge = log.read_text().splitlines()
    assert "--array=1-3" in array and "--gres=gpu:1" in array
    assert "--dependency=afterany:4242" in merge and merge.endswith("--merge")
