"""Shards of a sweep plan, and `dqprof merge` joining their run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dqprof.cli import app
from dqprof.results import RecordWriter, load_records, point_key, write_run
from dqprof.sweep import DEFAULT_M, SweepConfig, plan

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny-llama.json")
runner = CliRunner()


def plan_keys(cfg: SweepConfig) -> list[str]:
    return [k for g in plan(cfg)[1] for k in g.keys]


@pytest.mark.parametrize("model", ["gemma-4-e4b", TINY])
def test_shards_partition_the_plan_exactly(model):
    whole = plan_keys(SweepConfig(model=model))  # every registered backend
    assert len(whole) == len(set(whole))
    groups = len(plan(SweepConfig(model=model))[1])
    for n in (1, 2, 3, 4, 7, groups, groups + 3):
        shards = [plan_keys(SweepConfig(model=model, shard=(i, n))) for i in range(1, n + 1)]
        seen = [k for s in shards for k in s]
        assert len(seen) == len(set(seen)), f"shards of {n} overlap"
        assert set(seen) == set(whole), f"shards of {n} do not cover the plan"


@pytest.mark.parametrize("model", ["gemma-4-e4b", TINY])
def test_a_shape_never_spans_shards_and_shards_stay_balanced(model):
    """The gate normalizes each point's energy by bf16 at its shape and M on the same board:
    every backend of a shape, bf16 among them, lands in one shard (one board)."""
    whole = plan(SweepConfig(model=model))[1]
    shapes = {g.shape.name for g in whole}
    biggest = max(sum(g.cost for g in whole if g.shape.name == s) for s in shapes)
    for n in (2, 3, 4, 7):
        shards = [plan(SweepConfig(model=model, shard=(i, n)))[1] for i in range(1, n + 1)]
        owners = {}
        for i, groups in enumerate(shards):
            for g in groups:
                assert owners.setdefault(g.shape.name, i) == i, f"{g.shape.name} spans shards"
            assert [g.keys for g in groups] == [g.keys for g in whole
                                                if owners.get(g.shape.name) == i]  # plan order
        costs = [sum(g.cost for g in groups) for groups in shards]
        assert max(costs) - min(costs) <= biggest  # at most one shape's points apart
        assert all(costs) or n > len(shapes)
        again = [plan(SweepConfig(model=model, shard=(i, n)))[1] for i in range(1, n + 1)]
        assert [[g.keys for g in s] for s in again] == [[g.keys for g in s] for s in shards]


def test_cost_counts_the_points_a_group_measures():
    whole = plan(SweepConfig())[1]
    lm_head = [g for g in whole if g.shape.name == "lm_head"]
    assert {g.cost for g in lm_head if g.backend.name == "bf16"} == {len(DEFAULT_M)}
    assert {g.cost for g in lm_head if g.backend.quantized} == {0}  # skipped: stays bf16
    assert {g.cost for g in whole if g.backend.m_independent and g.shape.name != "lm_head"} == {1}


def test_an_empty_shard_says_so(tmp_path):
    out = tmp_path / "empty"
    result = runner.invoke(app, ["bench", "--device", "cpu", "--model", TINY, "--shapes",
                                 "lm_head", "--backends", "bf16", "--m", "1", "--repeats", "2",
                                 "--no-energy", "--no-attribution", "--hot", "--shard", "2/2",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "shard 2/2 holds no points" in " ".join(result.output.split())
    assert load_records(out) == []


def cpu_shard(tmp_path: Path, i: int, n: int) -> Path:
    out = tmp_path / f"shard-{i}"
    result = runner.invoke(app, ["bench", "--device", "cpu", "--model", TINY,
                                 "--backends", "bf16", "--m", "1,4", "--repeats", "3",
                                 "--no-energy", "--no-attribution", "--hot", "--shard", f"{i}/{n}",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_merge_joins_real_cpu_shards_into_the_whole_plan(tmp_path):
    shards = [cpu_shard(tmp_path, i, 2) for i in (1, 2)]
    out = tmp_path / "all"
    result = runner.invoke(app, ["merge", *map(str, shards), "-o", str(out)])
    assert result.exit_code == 0, result.output
    cfg = SweepConfig(model=TINY, backends="bf16", m=(1, 4), hot=True)
    assert sorted(r["key"] for r in load_records(out)) == sorted(plan_keys(cfg))
    info = json.loads((out / "run.json").read_text())
    assert [s["path"] for s in info["merged_from"]] == [str(s) for s in shards]
    assert info["config"]["shard"] == "1/1"  # every shard present: a whole run
    assert len(info["sessions"]) == 2
    # the merged folder is a run like any other: the gate reads it
    gate = runner.invoke(app, ["regress", "--baseline", str(out), "--current", str(out)])
    assert gate.exit_code == 0, gate.output


# -- refusals, on small recorded-looking runs --------------------------------------------------

def fake_shard(path: Path, shard: str, ms: tuple[int, ...], gpu: str = "NVIDIA H200",
               window_s: float = 0.5, suite_path: str = "bench/ci-smoke.toml",
               median_s: float = 1e-5, uuid: str | None = None) -> Path:
    cfg = {**SweepConfig(window_s=window_s).as_dict(), "shard": shard,
           "suite": {"path": suite_path, "repeats": 10}}
    path.mkdir(parents=True)
    write_run(path, {"schema": 1, "kind": "kernels", "model": "gemma-4-e4b", "config": cfg,
                     "environment": {"device": "cuda", "host": "gpu-1",
                                     "gpu": {"name": gpu, "uuid": uuid}},
                     "ceilings": {"copy_bytes_per_s": 4e12}, "idle_power_w": 80.0,
                     "sessions": [{"config": cfg}]})
    with RecordWriter(path) as w:
        for m in ms:
            key = point_key("gemma-4-e4b", "mlp.down_proj", m, "bf16")
            w.write({"schema": 1, "key": key, "model": "gemma-4-e4b", "layer": "mlp.down_proj",
                     "n": 2560, "k": 10240, "m": m, "backend": "bf16", "variant": "",
                     "status": "ok", "time": {"median_s": median_s * m, "rel_spread": 0.01}})
    return path


def merge(*args: str):
    return runner.invoke(app, ["merge", *args])


def test_shards_from_two_boards_keep_each_board(tmp_path):
    a = fake_shard(tmp_path / "a", "1/2", (1,), uuid="GPU-aaaa")
    b = fake_shard(tmp_path / "b", "2/2", (16,), uuid="b000")  # torch's spelling: no prefix
    assert merge(str(a), str(b), "-o", str(tmp_path / "all")).exit_code == 0
    info = json.loads((tmp_path / "all" / "run.json").read_text())
    assert [(b["uuid"], b["shards"]) for b in info["boards"]] == [("GPU-aaaa", ["1/2"]),
                                                                  ("GPU-b000", ["2/2"])]
    assert info["boards"][0]["ceilings"] == {"copy_bytes_per_s": 4e12}
    assert [s["board"]["uuid"] for s in info["merged_from"]] == ["GPU-aaaa", "GPU-b000"]
    # these records name no board of their own (as before dqprof kept one): the merged run's
    # environment is shard 1's, so the gate must not take it for every record's board
    from dqprof.gate.compare import load_side

    assert set(load_side(tmp_path / "all").boards.values()) == {None}
    assert set(load_side(a).boards.values()) == {"GPU-aaaa"}


def test_different_gpus_are_refused_unless_forced(tmp_path):
    a = fake_shard(tmp_path / "a", "1/2", (1,))
    b = fake_shard(tmp_path / "b", "2/2", (16,), gpu="NVIDIA H100 80GB HBM3")
    result = merge(str(a), str(b), "-o", str(tmp_path / "all"))
    assert result.exit_code == 2
    assert "H100" in result.output and not (tmp_path / "all" / "kernels.jsonl").exists()
    result = merge(str(a), str(b), "-o", str(tmp_path / "all"), "--force")
    assert result.exit_code == 0 and "WARNING" in result.output
    assert len(load_records(tmp_path / "all")) == 2


def test_different_configs_are_refused(tmp_path):
    a = fake_shard(tmp_path / "a", "1/2", (1,))
    b = fake_shard(tmp_path / "b", "2/2", (16,), window_s=1.0)
    result = merge(str(a), str(b), "-o", str(tmp_path / "all"))
    assert result.exit_code == 2 and "window_s" in result.output
    # the same suite reached by another path is the same sweep
    c = fake_shard(tmp_path / "c", "2/2", (16,), suite_path="./bench/ci-smoke.toml")
    assert merge(str(a), str(c), "-o", str(tmp_path / "ac")).exit_code == 0


def test_duplicates_must_be_identical(tmp_path):
    a = fake_shard(tmp_path / "a", "1/2", (1, 16))
    same = fake_shard(tmp_path / "same", "2/2", (16, 256))
    result = merge(str(a), str(same), "-o", str(tmp_path / "ok"))
    assert result.exit_code == 0 and "1 identical duplicate" in result.output
    assert len(load_records(tmp_path / "ok")) == 3
    other = fake_shard(tmp_path / "other", "2/2", (16,), median_s=2e-5)
    result = merge(str(a), str(other), "-o", str(tmp_path / "bad"))
    assert result.exit_code == 2
    assert "m=16" in result.output and not (tmp_path / "bad" / "kernels.jsonl").exists()


def test_partial_shard_set_warns_and_unusable_inputs_exit_2(tmp_path):
    a = fake_shard(tmp_path / "a", "1/3", (1,))
    b = fake_shard(tmp_path / "b", "3/3", (16,))
    result = merge(str(a), str(b), "-o", str(tmp_path / "part"))
    assert result.exit_code == 0 and "2/3" in result.output
    info = json.loads((tmp_path / "part" / "run.json").read_text())
    assert info["config"]["shard"] == "1/3+3/3"
    assert merge(str(a), "-o", str(tmp_path / "part")).exit_code == 2  # holds results already
    assert merge(str(a), str(tmp_path / "nope"), "-o", str(tmp_path / "x")).exit_code == 2
    (b / "run.json").unlink()
    assert merge(str(a), str(b), "-o", str(tmp_path / "y")).exit_code == 2
