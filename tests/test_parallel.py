"""`dqprof bench --gpus` on CPU: fake GPUs (DQPROF_FAKE_GPUS), `--device cpu` workers running a
tiny sweep; the merge, a worker killed mid-shard, and --resume on another number of GPUs."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dqprof.cli import app
from dqprof.errors import DqprofError
from dqprof.parallel import (
    FAKE_ENV,
    Gpu,
    Runner,
    Worker,
    default_command,
    eta_s,
    select_gpus,
    shard_folders,
)
from dqprof.results import load_records, read_run
from dqprof.sweep import SweepConfig, plan

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny-llama.json")
FAKE = "GPU-fake-0000=Fake H200,GPU-fake-1111=Fake H200"
ARGS = ["--device", "cpu", "--model", TINY, "--backends", "bf16", "--m", "1,2,3", "--repeats",
        "2", "--no-energy", "--no-attribution", "--hot"]
runner = CliRunner()
# a worker that dies by SIGKILL right after its second record is durable (a crashed driver or
# the OOM killer as the parent sees them)
KILLER = """
import os, signal, sys
from pathlib import Path
import dqprof.results as results
writes = [0]
original = results.RecordWriter.write
def write(self, rec):
    if writes[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, rec)
    writes[0] += 1
results.RecordWriter.write = write
from dqprof.parallel import worker_main
sys.exit(worker_main(Path(sys.argv[1])))
"""


def cli(*args: str) -> tuple[int, str]:
    """(exit code, output) as `dqprof` gives them: main() turns a DqprofError into one line."""
    result = runner.invoke(app, list(args))
    if isinstance(result.exception, DqprofError):
        return result.exception.exit_code, str(result.exception)
    return result.exit_code, result.output


def tiny_cfg() -> SweepConfig:
    return SweepConfig(model=TINY, backends="bf16", m=(1, 2, 3), device="cpu", repeats=2,
                       energy=False, attribution=False, hot=True)


def plan_keys() -> list[str]:
    return [k for g in plan(tiny_cfg())[1] for k in g.keys]


@pytest.fixture()
def fake_gpus(monkeypatch):
    monkeypatch.setenv(FAKE_ENV, FAKE)


def test_gpus_naming_a_missing_or_hidden_gpu_is_one_line_exit_2(fake_gpus, monkeypatch,
                                                                tmp_path):
    code, text = cli("bench", *ARGS, "--gpus", "0,5", "-o", str(tmp_path / "r"))
    assert code == 2 and len(text.splitlines()) == 1
    assert "no GPU 5" in text and "sees 2 GPU(s)" in text
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(DqprofError, match="CUDA_VISIBLE_DEVICES='0,1' hides the rest"):
        select_gpus("2", [Gpu(0, "GPU-a", "H200"), Gpu(1, "GPU-b", "H200")])
    for bad in ("x", "0,0", "-1"):
        with pytest.raises(DqprofError):
            select_gpus(bad, [Gpu(0, "GPU-a", "H200")])
    with pytest.raises(DqprofError, match="different models"):
        select_gpus("all", [Gpu(0, "GPU-a", "H200"), Gpu(1, "GPU-b", "L4")])
    code, text = cli("bench", *ARGS, "--gpus", "all", "--shard", "1/2", "-o", str(tmp_path / "s"))
    assert code == 2 and "drop --shard" in text


def test_eta_follows_the_slowest_worker():
    def worker(done: int, seeded: int, total: int) -> Worker:
        w = Worker(Gpu(0, "GPU-a", "x"), (1, 2), Path("/nonexistent"), [str(i) for i in
                                                                         range(total)])
        w.done, w.seeded = done, seeded
        return w

    assert eta_s([worker(10, 0, 20), worker(5, 0, 20)], 100.0) == pytest.approx(300.0)
    assert eta_s([worker(15, 10, 20), worker(20, 0, 20)], 50.0) == pytest.approx(50.0)
    assert eta_s([worker(3, 3, 10)], 10.0) is None  # nothing measured yet this session
    assert eta_s([worker(20, 0, 20)], 10.0) == 0.0


def test_two_gpus_one_merged_folder_same_records_as_a_plain_run(fake_gpus, tmp_path):
    out = tmp_path / "multi"
    code, text = cli("bench", *ARGS, "--gpus", "all", "-o", str(out))
    assert code == 0, text
    recs = load_records(out)
    assert [r["key"] for r in recs] == plan_keys()  # plan order, no gaps, no repeats
    info = read_run(out)
    assert info["config"]["shard"] == "1/1" and "incomplete" not in info
    assert [b["uuid"] for b in info["boards"]] == ["GPU-fake-0000", "GPU-fake-1111"]
    workers = info["sessions"][-1]["workers"]
    assert [w["shard"] for w in workers] == ["1/2", "2/2"]
    assert all(w["complete"] and w["exit_code"] == 0 for w in workers)
    # each shard folder holds what its worker measured, the merged file all of it; a shape's
    # points all on one GPU (the gate's per-bf16 energy needs them on one board)
    layers = []
    for w in workers:
        shard = load_records(out / w["folder"])
        assert {r["key"] for r in shard} <= {r["key"] for r in recs} and shard
        layers.append({r["layer"] for r in shard})
    assert not layers[0] & layers[1]

    plain = tmp_path / "plain"
    assert cli("bench", *ARGS, "-o", str(plain))[0] == 0
    volatile = {"time", "time_utc", "rel_err", "achieved", "method", "wall_s"}
    same = [{k: v for k, v in r.items() if k not in volatile} for r in load_records(plain)]
    assert same == [{k: v for k, v in r.items() if k not in volatile} for r in recs]


def test_a_killed_worker_loses_only_its_point_in_flight_and_resume_completes(fake_gpus,
                                                                             tmp_path):
    out = tmp_path / "run"

    def command(folder: Path) -> list[str]:
        if "2of2" in folder.name:
            return [sys.executable, "-c", KILLER, str(folder)]
        return default_command(folder)

    r = Runner(tiny_cfg(), out, "all", command=command)
    code = r.run()
    assert code != 0
    first, second = r.workers
    assert first.exit_code == 0 and first.done == len(first.keys)
    assert second.exit_code != 0 and second.done == 2 < len(second.keys)
    merged = {rec["key"] for rec in load_records(out)}
    assert merged == set(first.keys) | set(second.keys[:2])
    info = read_run(out)
    assert info["incomplete"] == ["2/2 on GPU 1 (GPU-fake-1111)"]
    assert "incomplete" in r.problems()[0] and "--resume" in r.problems()[0]
    kept = {rec["key"]: rec for rec in load_records(out)}

    # without --resume the folder is refused; with it, one GPU measures only the rest
    assert cli("bench", *ARGS, "--gpus", "0", "-o", str(out))[0] == 2
    code, text = cli("bench", *ARGS, "--gpus", "0", "--resume", "-o", str(out))
    assert code == 0, text
    recs = load_records(out)
    assert sorted(rec["key"] for rec in recs) == sorted(plan_keys())
    for rec in recs:  # what was recorded before is kept as it was, not measured again
        if rec["key"] in kept:
            assert rec == kept[rec["key"]]
    info = read_run(out)
    assert "incomplete" not in info and len(info["sessions"]) == 2
    resumed = info["sessions"][-1]["workers"]
    assert [w["shard"] for w in resumed] == ["1/1"]
    assert len(shard_folders(out)) == 3
    # a different sweep is not resumed into this folder
    code, text = cli("bench", *ARGS[:-1], "--gpus", "0", "--resume", "-o", str(out))
    assert code == 2 and "differs" in text


def test_more_gpus_than_shapes_runs_one_gpu_per_shape(fake_gpus, tmp_path):
    cfg = dataclasses.replace(tiny_cfg(), shapes="lm_head")
    r = Runner(cfg, tmp_path / "one", "all")
    assert [w.gpu.uuid for w in r.workers] == ["GPU-fake-0000"] and r.workers[0].shard == (1, 1)
    assert "1 of the 2 GPUs used" in r.notes[0]
    assert r.run() == 0
    assert [rec["key"] for rec in load_records(tmp_path / "one")] == r.workers[0].keys


def test_worker_config_round_trips(tmp_path):
    from dqprof.parallel import config_from_json, config_to_json

    cfg = SweepConfig(model=TINY, m=(1, 8), shard=(2, 3), suite={"path": "x", "m": [1]})
    back = config_from_json(json.loads(json.dumps(config_to_json(cfg))))
    assert back == cfg
