"""The CI gate on recorded-looking runs: timing samples and energy windows summarised by the
same code a sweep uses, on the ci-smoke plan's keys, with seeded run-to-run noise."""

from __future__ import annotations

import json
import math
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dqprof.cli import app
from dqprof.gate import compare as rg
from dqprof.measure.energy import CHUNK_S, EnergyStats
from dqprof.measure.timing import summarize
from dqprof.results import RecordWriter, point_key, write_run
from dqprof.sweep import SweepConfig, load_suite

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "ci-smoke.toml"
SHAPES = {"mlp.gate_up_proj": (20480, 2560), "mlp.down_proj": (2560, 10240),
          "sliding.qkv_proj": (3072, 2560)}
BYTES_PER_WEIGHT = {"bf16": 2.0, "bnb-nf4": 0.56, "marlin-gptq": 0.53, "tinygemm-int4": 0.53}
runner = CliRunner()


def ideal_time(n: int, k: int, m: int, backend: str) -> float:
    """A roofline-ish time per call: weight bytes at 4 TB/s or FLOPs at 700 TFLOP/s, plus launch."""
    return max(n * k * BYTES_PER_WEIGHT[backend] / 4e12, 2 * m * n * k / 700e12) + 4e-6


def time_dict(t: float, rel_sigma: float, rng: random.Random, repeats: int = 10) -> dict:
    return summarize([t * (1 + rng.gauss(0, rel_sigma)) for _ in range(repeats)], 100).as_dict()


def energy_dict(t: float, rng: random.Random, window_s: float = 0.5,
                energy_scale: float = 1.0) -> dict:
    """The energy window of a point timed at ``t`` s per call (sustained = burst time);
    ``energy_scale`` raises the power drawn, not the time."""
    power = 450 * energy_scale * (1 + rng.gauss(0, 0.003))
    calls = int(window_s / t)
    return EnergyStats(power * t, (power - 90) * t, power, 90.0, window_s, 5, calls, t,
                       None).as_dict()


def record(key_parts: tuple[str, int, str], time: dict, energy: dict | None) -> dict:
    layer, m, backend = key_parts
    n, k = SHAPES[layer]
    return {"schema": 1, "kind": "kernel", "key": point_key("gemma-4-e4b", layer, m, backend),
            "model": "gemma-4-e4b", "layer": layer, "n": n, "k": k, "m": m, "backend": backend,
            "variant": "", "status": "ok", "reason": None, "time": time, "energy": energy,
            "method": {"repeats": 10, "window_s": 0.5}}


def points() -> list[tuple[str, int, str]]:
    return [(layer, m, b) for layer in SHAPES for b in BYTES_PER_WEIGHT for m in (1, 16, 256, 2048)]


def run_info(gpu: str = "NVIDIA H200") -> dict:
    cfg = load_suite(SUITE, SweepConfig())
    return {"schema": 1, "kind": "kernels", "model": "gemma-4-e4b", "config": cfg.as_dict(),
            "environment": {"device": "cuda", "git": {"commit": "0" * 40},
                            "gpu": {"name": gpu, "driver": "570.124.06", "power_limit_w": 700.0},
                            "versions": {"torch": "2.9.0", "bitsandbytes": "0.49.1",
                                         "vllm": "0.20.2", "triton": "3.5.0"}}}


def make_run(path: Path, seed: int, scale: dict[str, float] | None = None,
             sigma: dict[str, float] | None = None, energy_scale: dict[str, float] | None = None,
             gpu: str = "NVIDIA H200", drop: tuple[str, ...] = (),
             records: list[dict] | None = None, clock: float = 1980.0,
             busy: tuple[str, ...] = ()) -> Path:
    """One sweep's run folder: each point timed with fresh noise from ``seed`` (a rerun of the
    same code is the same call with another seed); ``scale`` slows chosen points down."""
    rng = random.Random(seed)
    path.mkdir(parents=True)
    write_run(path, run_info(gpu))
    with RecordWriter(path) as w:
        for parts in points():
            key = point_key("gemma-4-e4b", *parts)
            t = ideal_time(*SHAPES[parts[0]], parts[1], parts[2]) * (scale or {}).get(key, 1.0)
            rec = record(parts, time_dict(t, (sigma or {}).get(key, 0.004), rng),
                         energy_dict(t, rng, energy_scale=(energy_scale or {}).get(key, 1.0)))
            rec["gpu_state"] = {"sm_clock_mhz": clock, "temp_c": 41, "power_w": 450.0,
                                "throttle": ["sw_power_cap"] if key in busy else [],
                                "other_processes": int(key in busy)}
            if key not in drop:
                w.write(rec)
        for rec in records or []:
            w.write(rec)
    return path


KEY = point_key("gemma-4-e4b", "mlp.down_proj", 16, "bnb-nf4")


def gate(tmp_path: Path, baseline: Path, current: Path, *extra: str,
         env: dict[str, str] | None = None):
    args = ["regress", "--baseline", str(baseline), "--current", str(current),
            "--max-slowdown", "5%", "--max-energy-increase", "7%",
            "--junit", str(tmp_path / "junit.xml"), "--summary", str(tmp_path / "summary.md"),
            *extra]
    return runner.invoke(app, args, env=env)


def junit_failures(tmp_path: Path) -> dict[str, str]:
    root = ET.parse(tmp_path / "junit.xml").getroot()
    return {f"{c.get('classname')}|{c.get('name')}": c.find("failure").get("message")
            for c in root.iter("testcase") if c.find("failure") is not None}


def flat(text: str) -> str:
    """Output without whitespace: terminal tables may break a row wherever they like."""
    return "".join(text.split())


def md(key: str) -> str:
    return key.replace("|", "\\|")  # as a markdown table cell writes it


def junit_name(key: str) -> str:
    return key.replace("|", ".", 1)  # classname model.layer, name m=..|backend|variant


def test_thresholds_parse_percent_or_fraction():
    assert rg.parse_fraction("5%") == pytest.approx(0.05)
    assert rg.parse_fraction("0.05") == pytest.approx(0.05)
    assert rg.parse_fraction(" 7.5% ") == pytest.approx(0.075)
    for bad in ("5", "abc", "-1%", "nan"):
        with pytest.raises(rg.DqprofError):
            rg.parse_fraction(bad)


def test_energy_edge_is_the_energy_chunk():
    assert rg.ENERGY_EDGE_S == CHUNK_S  # one fact, two modules: keep them in step


def test_same_run_against_itself_passes(tmp_path):
    run = make_run(tmp_path / "a", seed=1)
    result = gate(tmp_path, run, run)
    assert result.exit_code == 0, result.output
    headline = (tmp_path / "summary.md").read_text().splitlines()[0]
    assert "dqprof regress: 0 regressions, 0 improvements" in headline
    assert f"{len(points())} unchanged, 0 missing" in headline
    assert junit_failures(tmp_path) == {}


def test_rerun_of_same_commit_is_not_flagged(tmp_path):
    # decode points (m=1) jitter by 7 % a sample, as microsecond-long calls can
    noisy = {point_key("gemma-4-e4b", layer, 1, b): 0.07 for layer, m, b in points() if m == 1}
    base = make_run(tmp_path / "base", seed=1, sigma=noisy)
    reruns = [make_run(tmp_path / f"rerun{seed}", seed=seed, sigma=noisy) for seed in range(2, 10)]
    for rerun in reruns:
        result = gate(tmp_path, base, rerun)
        assert result.exit_code == 0, result.output
    # the noise band is what keeps them quiet: the threshold alone flags some of them
    assert any(gate(tmp_path, base, r, "--noise-k", "0").exit_code == 1 for r in reruns)


def test_real_slowdown_is_caught_and_named(tmp_path):
    base = make_run(tmp_path / "base", seed=1)
    cur = make_run(tmp_path / "cur", seed=2, scale={KEY: 1.2})
    result = gate(tmp_path, base, cur)
    assert result.exit_code == 1
    assert flat(KEY) in flat(result.output)
    failures = junit_failures(tmp_path)
    assert list(failures) == [junit_name(KEY)]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.splitlines()[0].endswith("1 regression, 0 improvements, "
                                            f"{len(points()) - 1} unchanged, 0 missing")
    assert md(KEY) in summary.split("### Regressions")[1].split("###")[0]
    # in GitHub Actions the regression is also an annotation on the run's page
    in_actions = gate(tmp_path, base, cur, env={"GITHUB_ACTIONS": "true"})
    assert f"::error title=kernel regression::{KEY}" in in_actions.output


def test_noisy_point_within_its_band_is_not_flagged(tmp_path):
    # both sides noisy (IQR ~ 10 % of the median), current 6 % slower: within the noise band
    noisy = {KEY: 0.08}
    base = make_run(tmp_path / "base", seed=1, sigma=noisy)
    cur = make_run(tmp_path / "cur", seed=1, sigma=noisy, scale={KEY: 1.06})
    result = gate(tmp_path, base, cur)
    assert result.exit_code == 0, result.output
    assert "within noise band" in (tmp_path / "summary.md").read_text()
    # the same 6 % on a quiet point is beyond both threshold and band
    quiet = make_run(tmp_path / "quiet", seed=1, scale={KEY: 1.06})
    assert gate(tmp_path, make_run(tmp_path / "qbase", seed=1), quiet).exit_code == 1


def test_improvement_is_reported_and_passes(tmp_path):
    base = make_run(tmp_path / "base", seed=1)
    result = gate(tmp_path, base, make_run(tmp_path / "cur", seed=2, scale={KEY: 0.8}))
    assert result.exit_code == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "0 regressions, 1 improvement," in summary.splitlines()[0]
    assert md(KEY) in summary.split("### Improvements")[1]


def test_energy_increase_alone_regresses(tmp_path):
    base = make_run(tmp_path / "base", seed=1)
    cur = make_run(tmp_path / "cur", seed=1, energy_scale={KEY: 1.15})
    assert gate(tmp_path, base, cur).exit_code == 1
    failures = junit_failures(tmp_path)
    assert list(failures) == [junit_name(KEY)] and "energy" in failures[junit_name(KEY)]


def test_energy_of_a_drifting_point_is_not_flagged(tmp_path):
    """A point whose sustained time per call strayed from its burst time (clocks sagging under
    the power cap) gets a wider energy band, as seen between two H200 reruns."""
    base = make_run(tmp_path / "base", seed=1)
    cur = make_run(tmp_path / "cur", seed=1, energy_scale={KEY: 1.08})
    records = [json.loads(line) for line in (cur / "kernels.jsonl").read_text().splitlines()]
    for r in records:
        if r["key"] == KEY:
            r["energy"]["s_per_call_in_window"] = r["time"]["median_s"] * 0.91
    (cur / "kernels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert gate(tmp_path, base, cur).exit_code == 0


def _edit(run: Path, key: str, fn) -> None:
    records = [json.loads(line) for line in (run / "kernels.jsonl").read_text().splitlines()]
    for r in records:
        if r["key"] == key:
            fn(r)
    (run / "kernels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def batch_sync(edges: float, spread: float = 0.01, window_s: float | None = None):
    """An edit making a record look like the batch-sync feeder's: its window states its own
    precision (the parts as the H200's session-5 records give them: edges 0.6-5.6 %)."""
    def fn(r: dict) -> None:
        parts = {"spread": spread, "edges": edges, "counter": 1e-5}
        r["energy"].update(feed="batch-sync", precision=sum(parts.values()),
                           precision_parts=parts, precision_target=0.005, stop="max")
        if window_s is not None:
            r["energy"]["window_s"] = window_s
    return fn


def test_energy_noise_of_batch_sync_records_is_their_own_edge_error():
    rec = record(("mlp.down_proj", 16, "bnb-nf4"), time_dict(1e-5, 0.0, random.Random(0)),
                 energy_dict(1e-5, random.Random(0), window_s=0.5))
    # records without energy.feed (the chunked feeder, e.g. bench/baselines/h200.jsonl): one
    # 5 ms chunk at each end of the window
    assert rg.window_edge(rec) == pytest.approx(2 * CHUNK_S / 0.5)
    batch_sync(edges=0.031, spread=0.047)(rec)
    assert rg.window_edge(rec) == pytest.approx(0.031)
    # the spread is not added on top: time jitter and drift already stand for it
    assert rg.energy_noise(rec) == pytest.approx(0.031, abs=1e-3)
    del rec["energy"]["precision_parts"]  # a batch-sync window that does not say: not compared
    assert "precision" in rg.energy_doubt(rec) and rg.sustained_time(rec) is None


@pytest.mark.parametrize("edges, window_s, change, fails", [
    (0.035, 0.5, 1.09, False),  # its own edges (3.5 %) are wider than 2 x 5 ms / 0.5 s
    (0.002, 0.2, 1.09, True),  # and narrower than 2 x 5 ms / 0.2 s
])
def test_energy_band_of_batch_sync_records_follows_their_stated_edges(tmp_path, edges, window_s,
                                                                      change, fails):
    base = make_run(tmp_path / "base", seed=1)
    cur = make_run(tmp_path / "cur", seed=1, energy_scale={KEY: change})
    for run in (base, cur):
        _edit(run, KEY, batch_sync(edges, window_s=window_s))
    assert gate(tmp_path, base, cur).exit_code == int(fails)
    if not fails:
        assert "energy beyond threshold but within noise band" in (
            tmp_path / "summary.md").read_text()


def test_old_baseline_against_batch_sync_run_takes_each_sides_own_edge():
    rng = random.Random(0)
    old = record(("mlp.down_proj", 16, "bnb-nf4"), time_dict(1e-5, 0.0, rng),
                 energy_dict(1e-5, rng, window_s=0.5))
    new = json.loads(json.dumps(old))
    batch_sync(edges=0.03)(new)
    p = rg.compare_point(KEY, old, new, rg.Gate())
    band = p.change("energy").band
    assert band == pytest.approx(2 * math.hypot(2 * CHUNK_S / 0.5, 0.03), rel=0.05)


def test_batch_sync_record_without_its_precision_is_not_energy_compared(tmp_path):
    base = make_run(tmp_path / "base", seed=1)
    cur = make_run(tmp_path / "cur", seed=1, energy_scale={KEY: 1.3})
    _edit(cur, KEY, lambda r: r["energy"].update(feed="batch-sync"))
    assert gate(tmp_path, base, cur).exit_code == 0
    row = next(x for x in (tmp_path / "summary.md").read_text().splitlines() if md(KEY) in x)
    assert "energy not compared: current: energy window states no call-count precision" in row


def test_power_capped_point_is_timed_by_its_sustained_figure(tmp_path):
    """At the power cap the burst median follows the clocks the previous point left; the gate
    compares the sustained time per call of the energy window there (H200: burst 286 -> 372 us
    in a rerun of one commit, sustained 334 -> 335 us)."""
    capped = point_key("gemma-4-e4b", "mlp.gate_up_proj", 2048, "bf16")

    def cap(burst: float, sustained: float):
        def fn(r: dict) -> None:
            r["time"].update(median_s=burst, q1_s=burst, q3_s=burst, rel_spread=0.001)
            r["energy"]["s_per_call_in_window"] = sustained
            r["gpu_state"] = {"throttle": ["sw_power_cap"]}
        return fn

    base = make_run(tmp_path / "base", seed=1)
    _edit(base, capped, cap(286e-6, 334e-6))
    rerun = make_run(tmp_path / "rerun", seed=2)
    _edit(rerun, capped, cap(372e-6, 335e-6))
    assert gate(tmp_path, base, rerun).exit_code == 0
    slow = make_run(tmp_path / "slow", seed=3)
    _edit(slow, capped, cap(372e-6, 420e-6))  # sustained +26 %: a real slowdown
    assert gate(tmp_path, base, slow).exit_code == 1
    assert list(junit_failures(tmp_path)) == [junit_name(capped)]


def test_point_failed_now_is_a_regression(tmp_path):
    base = make_run(tmp_path / "base", seed=1)
    broken = {**record(("mlp.down_proj", 16, "bnb-nf4"), {}, None), "status": "failed",
              "reason": "output differs from the fp32 reference: rel err 0.9 > 0.02",
              "time": None}
    cur = make_run(tmp_path / "cur", seed=2, drop=(KEY,), records=[broken])
    result = gate(tmp_path, base, cur)
    assert result.exit_code == 1
    assert "fp32 reference" in junit_failures(tmp_path)[junit_name(KEY)]


def test_missing_points_are_listed_and_optionally_fail(tmp_path):
    base = make_run(tmp_path / "base", seed=1)
    cur = make_run(tmp_path / "cur", seed=2, drop=(KEY,))
    result = gate(tmp_path, base, cur)
    assert result.exit_code == 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary.splitlines()[0].endswith(", 1 missing")
    assert md(KEY) in summary.split("### Missing")[1]
    assert gate(tmp_path, base, cur, "--fail-on-missing").exit_code == 1
    # and the other way round: a point the baseline never measured
    assert gate(tmp_path, cur, base).exit_code == 0
    assert "not in baseline" in (tmp_path / "summary.md").read_text()


def test_different_gpu_warns_loudly_but_still_gates(tmp_path):
    base = make_run(tmp_path / "base", seed=1)
    cur = make_run(tmp_path / "cur", seed=2, gpu="NVIDIA H100 80GB HBM3", scale={KEY: 1.2})
    result = gate(tmp_path, base, cur)
    assert result.exit_code == 1
    assert "WARNING" in result.output and flat("GPU differs") in flat(result.output)
    assert "GPU differs" in (tmp_path / "summary.md").read_text()


def test_corrupt_file_names_file_and_line(tmp_path):
    base = make_run(tmp_path / "base", seed=1)
    cur = make_run(tmp_path / "cur", seed=2)
    lines = (cur / "kernels.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"  # a record cut in half, mid-file
    (cur / "kernels.jsonl").write_text("".join(lines))
    result = gate(tmp_path, base, cur)
    assert result.exit_code == 2
    assert "kernels.jsonl:3" in flat(result.output)


def test_unusable_inputs_exit_2(tmp_path):
    base = make_run(tmp_path / "base", seed=1)
    assert gate(tmp_path, base, tmp_path / "nope").exit_code == 2
    other = tmp_path / "other.jsonl"  # a different model: no key in common
    other.write_text("".join(json.dumps({**r, "key": "x|" + r["key"]}) + "\n" for r in
                             map(json.loads, (base / "kernels.jsonl").read_text().splitlines())))
    result = gate(tmp_path, base, other)
    assert result.exit_code == 2 and "no common points" in result.output
    dup = tmp_path / "dup.jsonl"
    dup.write_text((base / "kernels.jsonl").read_text() * 2)
    assert gate(tmp_path, base, dup).exit_code == 2
    assert gate(tmp_path, base, base, "--max-slowdown", "5").exit_code == 2


def test_update_baseline_writes_jsonl_with_run_json_beside(tmp_path):
    skipped = {**record(("mlp.down_proj", 1, "bf16"), {}, None), "key": "gemma-4-e4b|x|m=1|y|",
               "status": "skipped", "reason": "python package 'vllm' is not installed"}
    pr = make_run(tmp_path / "pr", seed=1, records=[skipped])
    baseline = tmp_path / "baselines" / "h200.jsonl"
    result = runner.invoke(app, ["regress", "--baseline", str(baseline), "--current", str(pr),
                                 "--update-baseline"])
    assert result.exit_code == 0, result.output
    written = [json.loads(x) for x in baseline.read_text().splitlines()]
    assert {r["status"] for r in written} == {"ok"} and len(written) == len(points())
    beside = json.loads((tmp_path / "baselines" / "h200.run.json").read_text())
    assert beside["environment"]["gpu"]["name"] == "NVIDIA H200"
    result = gate(tmp_path, baseline, make_run(tmp_path / "next", seed=2))
    assert result.exit_code == 0
    assert "no run.json" not in result.output  # the environment was found beside the jsonl


def test_missing_run_json_is_warned(tmp_path):
    base = make_run(tmp_path / "base", seed=1)
    (base / "run.json").unlink()
    result = gate(tmp_path, base, make_run(tmp_path / "cur", seed=2))
    assert result.exit_code == 0 and flat("no run.json for") in flat(result.output)
    # a baseline made from it would never warn about a GPU or driver change: refused
    result = runner.invoke(app, ["regress", "--baseline", str(tmp_path / "b.jsonl"),
                                 "--current", str(base), "--update-baseline"])
    assert result.exit_code == 2 and not (tmp_path / "b.jsonl").exists()


def test_gpu_state_explains_what_changed(tmp_path):
    base = make_run(tmp_path / "base", seed=1)
    cur = make_run(tmp_path / "cur", seed=2, clock=1410.0, busy=(KEY,), scale={KEY: 1.2})
    result = gate(tmp_path, base, cur)
    assert result.exit_code == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "median SM clock" in summary  # locked on one side only
    row = next(x for x in summary.splitlines() if md(KEY) in x)
    assert "other process" in row and "sw_power_cap" in row
