"""The sweep end to end on CPU through the CLI, and every documented fault."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dqprof.cli import app
from dqprof.errors import DqprofError
from dqprof.kernels import _REGISTRY, register
from dqprof.kernels.bf16 import Bf16
from dqprof.results import RecordWriter, load_records
from dqprof.sweep import Sweep, SweepConfig, plan

TINY = str(Path(__file__).parent / "data" / "tiny-llama.json")
FAST = ["--device", "cpu", "--model", TINY, "--repeats", "2", "--l2-factor", "0.02"]


def cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def run_main(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dqprof", *args], capture_output=True,
                          text=True, timeout=300, **kw)


def keys(run: Path) -> list[str]:
    return [r["key"] for r in load_records(run)]


def test_cpu_sweep_writes_records_and_run_json(tmp_path) -> None:
    run = tmp_path / "run"
    res = run_main("bench", *FAST, "--m", "1,8", "--shapes", "down_proj,lm_head",
                   "--backends", "bf16,bnb-nf4,marlin-gptq", "-o", str(run))
    assert res.returncode == 0, res.stderr
    recs = {r["key"]: r for r in load_records(run)}
    assert len(recs) == 12  # 2 shapes x 3 backends x 2 M
    ok = [r for r in recs.values() if r["status"] == "ok"]
    assert {(r["layer"], r["backend"]) for r in ok} == {
        ("mlp.down_proj", "bf16"), ("mlp.down_proj", "bnb-nf4"), ("lm_head", "bf16")}
    for r in ok:
        assert r["rel_err"] < 2e-2 and r["time"]["median_s"] > 0 and r["energy"] is None
        assert r["traffic"]["total"] > 0 and r["flops"] == 2 * r["m"] * r["n"] * r["k"]
    skipped = {r["reason"] for r in recs.values() if r["status"] == "skipped"}
    assert any("cuda only" in s for s in skipped) and any("stays bf16" in s for s in skipped)
    info = json.loads((run / "run.json").read_text())
    assert info["schema"] == 1 and info["environment"]["versions"]["torch"]
    assert info["sessions"][0]["counts"]["ok"] == len(ok)
    assert len(info["environment"]["source_sha256"]) == 64
    # a group's quantize + copies are timed once, in its first point's phases
    for layer, backend in {(r["layer"], r["backend"]) for r in ok}:
        group = sorted((r for r in ok if (r["layer"], r["backend"]) == (layer, backend)),
                       key=lambda r: r["m"])
        assert [("prepare" in r["wall_s"]) for r in group] == [True, False]


def test_existing_run_needs_resume(tmp_path) -> None:
    args = ["bench", *FAST, "--m", "1", "--shapes", "down_proj", "--backends", "bf16",
            "-o", str(tmp_path)]
    assert run_main(*args).returncode == 0
    again = run_main(*args)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_main(*args, "--resume")
    assert resumed.returncode == 0 and "1 already recorded" in resumed.stdout
    assert len(keys(tmp_path)) == 1


def test_verbose_logs_each_phase(tmp_path) -> None:
    """--verbose names the phase a point finished last: where a stuck sweep stopped."""
    res = run_main("bench", *FAST, "--m", "1", "--shapes", "down_proj", "--backends", "bf16",
                   "-o", str(tmp_path), "--verbose")
    assert res.returncode == 0, res.stderr
    assert "mlp.down_proj bf16: quantizing" in res.stderr
    for phase in ("check", "capture", "attribution", "timing", "energy"):
        assert f"mlp.down_proj bf16 m=1: {phase} done in" in res.stderr
    quiet = run_main("bench", *FAST, "--m", "1", "--shapes", "down_proj", "--backends", "bf16",
                     "-o", str(tmp_path / "q"))
    assert "done in" not in quiet.stderr


def test_kill_and_resume_loses_nothing(tmp_path) -> None:
    """kill -9 mid-sweep, a torn last line, then --resume: every planned point once."""
    run = tmp_path / "run"
    args = ["bench", *FAST, "--m", "1,2,4,8,16,32", "--backends", "bf16,bnb-nf4",
            "-o", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "dqprof", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    path = run / "kernels.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if path.exists() and path.read_text().count("\n") >= 5:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with path.open("a") as f:  # the point in flight when the writer died
        f.write('{"schema": 1, "key": "torn')
    done_before = path.read_text().count("\n")
    assert done_before >= 5
    res = run_main(*args, "--resume")
    assert res.returncode == 0, res.stderr
    got = keys(run)
    cfg = SweepConfig(model=TINY, m=(1, 2, 4, 8, 16, 32), backends="bf16,bnb-nf4", device="cpu")
    planned = [k for g in plan(cfg)[1] for k in g.keys]
    assert sorted(got) == sorted(planned)  # nothing lost, nothing twice


def test_corrupt_line_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "kernels.jsonl"
    with RecordWriter(tmp_path) as w:
        w.write({"schema": 1, "key": "a", "model": "m", "layer": "l", "n": 1, "k": 1, "m": 1,
                 "backend": "bf16", "variant": "", "status": "ok"})
    path.write_text(path.read_text() + "garbage\n" + path.read_text())
    with pytest.raises(DqprofError, match=r"kernels.jsonl:2: corrupt record"):
        load_records(path)
    res = run_main("report", str(tmp_path), "-o", str(tmp_path / "out"))
    assert res.returncode == 2 and "kernels.jsonl:2" in res.stderr


def test_other_schema_is_refused(tmp_path) -> None:
    (tmp_path / "kernels.jsonl").write_text(json.dumps(
        {"schema": 99, "key": "a", "model": "m", "layer": "l", "n": 1, "k": 1, "m": 1,
         "backend": "bf16", "variant": "", "status": "ok"}) + "\n")
    with pytest.raises(DqprofError, match="schema version 99"):
        load_records(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_no_gpu_points_to_cpu_mode_and_profile(tmp_path) -> None:
    res = run_main("bench", "--m", "1", "-o", str(tmp_path / "r"))
    assert res.returncode == 3
    assert "--device cpu" in res.stderr and "dqprof report" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model"),
    (["--backends", "bf17"], "unknown backend"),
    (["--backends", "marlin-gptq[speed=fast]"], "has no option speed"),
    (["--m", "1,x"], "comma-separated integers"),
    (["--shapes", "nothing"], "no shape matches"),
    (["--shard", "3/2"], "--shard"),
    (["--point-timeout", "-1"], "--point-timeout must be positive"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message) -> None:
    res = run_main("bench", "--device", "cpu", *args, "-o", str(tmp_path / "r"))
    assert res.returncode == 2
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0]


def test_malformed_config_is_exit_2(tmp_path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("[1, 2]")
    res = run_main("shapes", "--model", str(bad))
    assert res.returncode == 2 and "not a JSON object" in res.stderr


class _Boom(Bf16):
    name = "test-boom"

    def __call__(self, state, x):
        if x.shape[0] > 1:
            raise RuntimeError("kernel exploded")
        return super().__call__(state, x)


class _Wrong(Bf16):
    name = "test-wrong"

    def __call__(self, state, x):
        return super().__call__(state, x) * 1.5


class _Slow(Bf16):
    name = "test-slow"

    def __call__(self, state, x):
        if x.shape[0] > 1:
            time.sleep(0.05)  # a path whose every call is slow on the host
        return super().__call__(state, x)


@pytest.fixture()
def test_backends():
    for b in (_Boom, _Wrong, _Slow):
        register(b)
    yield
    for name in ("test-boom", "test-wrong", "test-slow"):
        _REGISTRY.pop(name)


def test_a_point_too_slow_to_time_fails_with_its_cost(tmp_path, test_backends) -> None:
    # the sweep must never stall for minutes on one point without a record
    cfg = SweepConfig(model=TINY, shapes="down_proj", m=(1, 4), device="cpu", repeats=2,
                      l2_factor=0.02, backends="test-slow", max_replay_s=0.04)
    counts = Sweep(cfg, tmp_path).run()
    recs = {r["m"]: r for r in load_records(tmp_path)}
    assert counts["ok"] == 1 and counts["failed"] == 1
    assert recs[1]["status"] == "ok" and 0 < recs[1]["method"]["host_pass_s"] < 0.04
    assert "rotated calls took" in recs[4]["reason"] and "time" not in recs[4]


def test_raising_and_wrong_backends_fail_and_the_sweep_goes_on(tmp_path, test_backends) -> None:
    cfg = SweepConfig(model=TINY, shapes="down_proj", m=(1, 4), device="cpu", repeats=2,
                      l2_factor=0.02, backends="test-boom,test-wrong,bf16")
    counts = Sweep(cfg, tmp_path).run()
    recs = {(r["backend"], r["m"]): r for r in load_records(tmp_path)}
    assert counts == {"ok": 3, "skipped": 0, "failed": 3, "resumed": 0}
    assert recs[("test-boom", 1)]["status"] == "ok"
    assert "kernel exploded" in recs[("test-boom", 4)]["reason"]
    for m in (1, 4):  # a wrong path is never timed
        wrong = recs[("test-wrong", m)]
        assert wrong["status"] == "failed" and "fp32 reference" in wrong["reason"]
        assert "time" not in wrong
        assert recs[("bf16", m)]["status"] == "ok"


def test_nvml_missing_gives_a_reason(monkeypatch) -> None:
    from dqprof.measure import nvml

    monkeypatch.setitem(sys.modules, "pynvml", None)
    handle, why = nvml.open_nvml(0)
    assert handle is None and "nvidia-ml-py" in why


def test_shapes_and_backends_commands() -> None:
    res = cli("shapes", "--json")
    assert res.exit_code == 0
    names = [s["name"] for s in json.loads(res.stdout)]
    assert "mlp.gate_up_proj" in names and "lm_head" in names
    assert cli("backends").exit_code == 0


class _FakeNvml:
    """Two GPUs; the counter tells them apart."""

    def __init__(self) -> None:
        self.uuids = ["GPU-aaaa", "GPU-bbbb"]

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.uuids[handle]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return 1000 * (handle + 1)


def test_nvml_reads_the_gpu_cuda_uses_not_nvml_index_0(monkeypatch) -> None:
    # CUDA_VISIBLE_DEVICES=1: CUDA's device 0 is the host's second GPU (a bug once read the
    # first GPU's counter, busy with another job, into a whole vLLM matrix)
    from dqprof.measure import nvml

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(nvml, "_torch_uuid", lambda i: "GPU-bbbb")
    handle, why = nvml.open_nvml(0)
    assert why is None and handle.energy_mj() == 2000 and "GPU-bbbb" in handle.matched
    # no UUID to match while GPUs are hidden: no handle, and a reason, never a guess
    monkeypatch.setattr(nvml, "_torch_uuid", lambda i: None)
    handle, why = nvml.open_nvml(0)
    assert handle is None and "CUDA_VISIBLE_DEVICES" in why
    # nothing hidden: CUDA's and NVML's numbering agree
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    handle, why = nvml.open_nvml(0)
    assert handle.energy_mj() == 1000 and handle.matched == "index 0"


def test_named_commit_wins_over_a_stale_git(monkeypatch) -> None:
    from dqprof.measure.environment import git_commit

    monkeypatch.setenv("DQPROF_GIT_COMMIT", "f" * 40)
    assert git_commit() == {"commit": "f" * 40, "dirty": None, "source": "DQPROF_GIT_COMMIT"}
    monkeypatch.delenv("DQPROF_GIT_COMMIT")
    assert git_commit()["commit"] != "f" * 40


def test_machete_rules_without_a_gpu() -> None:
    from dqprof.kernels import create
    from dqprof.models.shapes import LinearShape

    gptq, awq = create("machete-gptq"), create("machete-awq")
    assert gptq.unavailable("cpu") and "cuda" in gptq.unavailable("cpu")
    ok = LinearShape("mlp.down_proj", "mlp", 2560, 10240, (2560,), ("down",), 42, True)
    assert gptq.supports(ok) is None
    odd = LinearShape("odd", "mlp", 2560 + 64, 10240, (2624,), ("odd",), 1, True)
    assert "N % 128" in gptq.supports(odd)
    # AWQ's zero points reach Machete as bf16 -scale*zp per group: bf16 bytes, not int4
    assert awq.traffic(ok, 1).scales == 2 * gptq.traffic(ok, 1).scales


def test_sigusr1_prints_the_stack_and_the_command_goes_on() -> None:
    # a stuck sweep or vLLM run says where it is (gpu_session.sh signals before it kills)
    code = ("import faulthandler, os, signal, sys, time\n"
            "sys.argv = ['dqprof', 'backends']\n"
            "from dqprof.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(0.2)\n"
            "print('still running')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "still running" in out.stdout
    assert "most recent call first" in out.stderr


STUCK = f"""
import time, sys
from dqprof.kernels import register
from dqprof.kernels.bf16 import Bf16
from dqprof.sweep import Sweep, SweepConfig

@register
class Stuck(Bf16):
    name = "test-stuck"
    def __call__(self, state, x):
        if x.shape[0] > 1:
            time.sleep(3600)  # a kernel that never returns
        return super().__call__(state, x)

cfg = SweepConfig(model={TINY!r}, shapes="down_proj", m=(1, 4, 8), device="cpu", repeats=2,
                  l2_factor=0.02, backends="test-stuck", point_timeout_s=3)
Sweep(cfg, sys.argv[1], resume=True).run()
"""


def test_a_stuck_point_is_recorded_and_resume_goes_on(tmp_path) -> None:
    """A point that never returns: failed record, exit 4 in seconds; the next run moves on."""
    first = subprocess.run([sys.executable, "-c", STUCK, str(tmp_path)], capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 4, first.stderr
    assert "did not finish in 3 s" in first.stderr
    recs = {r["m"]: r for r in load_records(tmp_path)}
    assert recs[1]["status"] == "ok" and recs[4]["status"] == "failed" and 8 not in recs
    assert "--resume" in recs[4]["reason"]
    second = subprocess.run([sys.executable, "-c", STUCK, str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 4  # m=8 is stuck too, m=4 is not redone
    assert [r["m"] for r in load_records(tmp_path)] == [1, 4, 8]


def test_point_timeout_flag(tmp_path) -> None:
    """`dqprof bench --point-timeout S`: a stuck point fails after S seconds, exit 4."""
    script = STUCK.replace("Sweep(cfg, sys.argv[1], resume=True).run()", "") + (
        "from dqprof.cli import main\n"
        "sys.argv = ['dqprof', 'bench', '--device', 'cpu', '--model', cfg.model, '--shapes',\n"
        "            'down_proj', '--m', '4', '--backends', 'test-stuck', '--repeats', '2',\n"
        "            '--l2-factor', '0.02', '--point-timeout', '2', '-o', sys.argv[1]]\n"
        "main()\n")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 4, res.stderr
    (rec,) = load_records(tmp_path)
    assert rec["status"] == "failed" and "did not finish in 2 s" in rec["reason"]
