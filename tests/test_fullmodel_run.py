"""The runner without a GPU: workload planning, energy windows, worker loop, failures."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dqprof.cli import app
from dqprof.errors import DqprofError
from dqprof.fullmodel import workload as W
from dqprof.fullmodel.energy import TickMeter, measure_window
from dqprof.fullmodel.plugin import KERNEL_LINE
from dqprof.fullmodel.preflight import CheckpointInfo
from dqprof.fullmodel.records import (
    ModelRecordWriter,
    base_record,
    latest,
    load_model_records,
    model_path,
)
from dqprof.fullmodel.runner import (
    QUANTS,
    PhaseDisplay,
    RunConfig,
    Runner,
    check_quant,
    failure_reason,
    parse_quants,
)
from dqprof.fullmodel.synth import SynthOptions, synthesize
from dqprof.fullmodel.worker import (
    WorkerSpec,
    fp8_unsupported,
    parse_attention_backend,
    parse_linear_kernel,
    run_points,
)

TICK = 0.1


# -- a simulated GPU: time, an energy counter that ticks every 100 ms, generate calls -------

class World:
    def __init__(self, busy_w: float = 400.0, idle_w: float = 100.0):
        self.t, self.busy_w, self.idle_w = 1000.0, busy_w, idle_w
        self.segments: list[tuple[float, float, float]] = []

    def clock(self) -> float:
        return self.t

    def advance(self, dt: float, busy: bool) -> None:
        self.segments.append((self.t, self.t + dt, self.busy_w if busy else self.idle_w))
        self.t += dt

    def energy_at(self, t: float) -> float:
        return sum(p * (min(b, t) - a) for a, b, p in self.segments if a < t)

    def read_mj(self) -> int:  # the counter shows the energy at its last update
        return int(round(1000 * self.energy_at(math.floor(self.t / TICK + 1e-9) * TICK)))


class FakeMeter:
    def __init__(self, world: World):
        self.world = world

    def wait_tick(self) -> tuple[int, float]:
        nxt = (math.floor(self.world.t / TICK + 1e-9) + 1) * TICK
        self.world.advance(nxt - self.world.t, busy=False)
        return self.world.read_mj(), self.world.t

    def ticks_between(self, t0: float, t1: float) -> int:
        return math.floor(t1 / TICK + 1e-9) - math.floor(t0 / TICK + 1e-9)


class FakeEngine:
    """A call lasts 20 ms + 1 ms per generated token; prompts are checked for freshness."""

    def __init__(self, world: World, short_by: int = 0, oom_at: int | None = None):
        self.world, self.short_by, self.oom_at = world, short_by, oom_at
        self.seen: set[tuple[int, ...]] = set()
        self.calls = 0

    @staticmethod
    def duration(max_tokens: int) -> float:
        return 0.02 + 0.001 * max_tokens

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[int]:
        self.calls += 1
        if self.oom_at is not None and self.calls >= self.oom_at:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        first = tuple(prompts[0][:8])
        assert first not in self.seen  # no call reuses another's prompts
        self.seen.add(first)
        self.world.advance(self.duration(max_tokens), busy=True)
        return [max_tokens - self.short_by] * len(prompts)


def _spec(tmp_path: Path, points: list[tuple[str, int, int, int]], **kw) -> WorkerSpec:
    return WorkerSpec(run_dir=str(tmp_path), model_path="ck", model_name="m", quant="bf16",
                      vllm_quantization=None, vocab=1000,
                      points=[{"workload": w, "input_len": i, "output_len": o, "batch": b}
                              for w, i, o, b in points],
                      window={"min_s": 1.0, "min_ticks": 12, "max_calls": 1000}, **kw)


# -- workload -----------------------------------------------------------------------------

def test_parse_and_plan() -> None:
    assert W.parse_workloads("decode,prefill") == [W.WORKLOADS["decode"], W.WORKLOADS["prefill"]]
    assert W.WORKLOADS["decode"] == W.Workload("decode", 128, 512)
    assert W.WORKLOADS["prefill"] == W.Workload("prefill", 2048, 16)
    assert W.parse_workloads("16:8") == [W.Workload("16:8", 16, 8)]
    for bad in ("nope", "16:1", "a:b"):
        with pytest.raises(DqprofError):
            W.parse_workloads(bad)
    assert W.parse_batches("32,1,8") == (32, 1, 8)
    with pytest.raises(DqprofError):
        W.parse_batches("1,x")
    pts = W.plan(W.parse_workloads("decode,prefill"), (32, 1, 8, 1))
    assert [p.label for p in pts] == ["decode b=1", "prefill b=1", "decode b=8", "prefill b=8",
                                      "decode b=32", "prefill b=32"]
    assert W.engine_limits(pts) == {"max_model_len": 2064, "max_num_seqs": 32,
                                    "cudagraph_capture_sizes": [1, 8, 32]}


def test_prompts_are_fresh_and_in_range() -> None:
    a = W.make_prompts(4, 16, 500, 0, (0, 0, 0, 0))
    assert len(a) == 4 and all(len(p) == 16 for p in a)
    assert min(min(p) for p in a) >= W.FIRST_TOKEN_ID and max(max(p) for p in a) < 500
    assert a == W.make_prompts(4, 16, 500, 0, (0, 0, 0, 0))  # deterministic
    assert a != W.make_prompts(4, 16, 500, 0, (0, 0, 0, 1))  # the next call differs
    assert a != W.make_prompts(4, 16, 500, 1, (0, 0, 0, 0))  # another seed differs


def test_window_rule() -> None:
    rule = W.WindowRule(min_s=5.0, min_ticks=50)
    assert not rule.done(0.0, 0, 0)
    assert not rule.done(4.9, 60, 3)  # too short
    assert not rule.done(5.1, 49, 3)  # too few counter updates
    assert rule.done(5.1, 50, 1)
    assert rule.done(5.1, None, 1)  # no NVML: time alone decides
    assert W.WindowRule(min_s=0, min_ticks=0).done(0.0, None, 1)  # --window 0: one call
    assert W.WindowRule(max_calls=3).done(0.1, 0, 3)
    assert rule.calls_needed(0.7) == 8 and rule.calls_needed(20.0) == 1
    assert W.WindowRule(min_s=1.0, min_ticks=50).calls_needed(1.0) == 5  # ticks dominate


def test_budget_helpers() -> None:
    rule = W.WindowRule(min_s=5.0, min_ticks=50)
    need = (8 * 0.7 + 0.7 + 0.2) + (50 * 0.1 + 0.1 + 0.2)
    assert W.point_fits(need + 0.01, rule, 0.7, 0.1)
    assert not W.point_fits(need - 0.5, rule, 0.7, 0.1)
    assert W.budget_share(600, 4) == 150 and W.budget_share(10, 0) == 10


def test_derive_splits_prefill_and_decode() -> None:
    p = W.Point(W.Workload("x", 100, 11), 4)
    full = W.Window(calls=2, seconds=4.0, tokens_in=800, tokens_out=88, energy_j=800.0)
    pre = W.Window(calls=10, seconds=5.0, tokens_in=4000, tokens_out=40, energy_j=500.0)
    d = W.derive(p, full, pre, idle_w=50.0)
    assert d["s_per_call"] == 2.0 and d["j_per_call"] == 400.0
    assert d["prefill"]["j_per_token"] == pytest.approx(50.0 / 400)
    assert d["prefill"]["j_per_token_above_idle"] == pytest.approx((50 - 50 * 0.5) / 400)
    assert d["decode"]["tokens"] == 40
    assert d["decode"]["j_per_token"] == pytest.approx((400 - 50) / 40)
    assert d["decode"]["j_per_token_above_idle"] == pytest.approx((350 - 50 * 1.5) / 40)
    assert d["decode"]["tokens_per_s"] == pytest.approx(40 / 1.5)
    assert d["j_per_output_token"] == pytest.approx(400 / 44)
    assert d["power_w"] == pytest.approx(200.0)
    assert "max_tokens=1" in d["split_method"]
    assert d["decode"]["share_of_call"] == pytest.approx(0.75) and d["decode"]["flag"] is None
    # a prefill-heavy call leaves decode a sliver of the call: flagged, not trusted
    heavy = W.derive(p, full, W.Window(calls=10, seconds=19.0, tokens_in=4000, tokens_out=40,
                                       energy_j=3900.0), idle_w=50.0)
    assert heavy["decode"]["share_of_call"] == pytest.approx(0.05)
    assert "decode-heavy" in heavy["decode"]["flag"]
    no_energy = W.derive(p, W.Window(2, 4.0, 800, 88), W.Window(10, 5.0, 4000, 40), None)
    assert no_energy["decode"]["j_per_token"] is None and no_energy["tokens_per_s"] == 22.0


# -- energy windows -----------------------------------------------------------------------

def test_window_energy_is_exact_on_ticks() -> None:
    world = World(busy_w=400.0, idle_w=100.0)
    world.advance(0.037, busy=False)  # start between ticks
    rule = W.WindowRule(min_s=1.0, min_ticks=12)
    call_s = 0.23

    def call(i: int) -> tuple[int, int]:
        world.advance(call_s, busy=True)
        return 10, 5

    win = measure_window(call, rule, FakeMeter(world), idle_w=100.0, clock=world.clock)
    # 5 calls pass 1 s but span 11 ticks; the 6th reaches 12
    assert win.calls == 6 and win.seconds == pytest.approx(6 * call_s)
    assert win.tokens_in == 60 and win.tokens_out == 30
    assert win.ticks >= 12 and win.gap_s == pytest.approx(win.tick_window_s - win.seconds)
    # gaps at idle power removed: exactly the busy energy remains
    assert win.energy_j == pytest.approx(400.0 * 6 * call_s)
    assert win.raw_energy_j == pytest.approx(400.0 * 6 * call_s + 100.0 * win.gap_s)
    timed = measure_window(call, rule, None, None, clock=world.clock)
    assert timed.energy_j is None and timed.calls == 5  # no meter: time alone decides


def test_tick_meter_thread_counts_real_ticks() -> None:
    start = time.perf_counter()
    meter = TickMeter(lambda: int((time.perf_counter() - start) / 0.01))  # 10 ms ticks
    meter.start()
    t0 = time.perf_counter()
    time.sleep(0.2)
    t1 = time.perf_counter()
    meter.stop()
    assert 12 <= meter.ticks_between(t0, t1) <= 21
    e, t = meter.wait_tick()
    assert e >= 20 and t >= t1


# -- the worker loop ----------------------------------------------------------------------

def test_run_points_measures_and_splits(tmp_path: Path) -> None:
    world = World()
    engine = FakeEngine(world)
    spec = _spec(tmp_path, [("a", 16, 9, 2), ("b", 32, 5, 4)])
    recs: list[dict] = []
    run_points(engine, spec, FakeMeter(world), 100.0, recs.append, {"checkpoint": "ck"},
               clock=world.clock, wall=world.clock)
    assert [r["status"] for r in recs] == ["ok", "ok"]
    r = recs[0]
    assert r["key"] == "m|bf16|a|b=2" and r["checkpoint"] == "ck"
    full, pre = r["windows"]["full"], r["windows"]["prefill"]
    assert full["tokens_out"] == full["calls"] * 2 * 9 and pre["tokens_out"] == pre["calls"] * 2
    assert full["seconds"] >= 1.0 and full["ticks"] >= 12 and pre["ticks"] >= 12
    d_full, d_pre = FakeEngine.duration(9), FakeEngine.duration(1)
    assert r["decode"]["j_per_token"] == pytest.approx(400 * (d_full - d_pre) / (2 * 8))
    assert r["prefill"]["j_per_token"] == pytest.approx(400 * d_pre / (2 * 16))
    assert r["decode"]["j_per_token_above_idle"] == pytest.approx(300 * (d_full - d_pre) / 16)
    assert r["method"]["warmup_calls"] == 1


def test_run_points_records_failures_and_budget(tmp_path: Path) -> None:
    world = World()
    recs: list[dict] = []
    spec = _spec(tmp_path, [("a", 16, 9, 2), ("b", 16, 9, 2)])
    run_points(FakeEngine(world, short_by=1), spec, FakeMeter(world), 100.0, recs.append, {},
               clock=world.clock, wall=world.clock)
    assert [r["status"] for r in recs] == ["failed", "failed"]
    assert "expected 2 x 9" in recs[0]["reason"]
    recs.clear()
    spec.deadline = world.clock() + 1.5  # less than two windows of 1 s
    run_points(FakeEngine(world), spec, FakeMeter(world), 100.0, recs.append, {},
               clock=world.clock, wall=world.clock)
    assert [r["status"] for r in recs] == ["skipped", "skipped"]
    assert "time budget" in recs[0]["reason"]
    recs.clear()
    spec.deadline = None
    with pytest.raises(RuntimeError, match="out of memory"):
        run_points(FakeEngine(world, oom_at=1), spec, FakeMeter(world), 100.0, recs.append, {},
                   clock=world.clock, wall=world.clock)
    assert recs[0]["status"] == "failed" and len(recs) == 1  # the runner records the rest


def test_attention_backend_from_logs() -> None:
    assert parse_attention_backend(["Using AttentionBackendEnum.TRITON_ATTN backend."]) == \
        "TRITON_ATTN"
    assert parse_attention_backend([
        "Using FLASH_ATTN attention backend out of potential backends: ['FLASH_ATTN']."]) == \
        "FLASH_ATTN"
    assert parse_attention_backend(["Gemma4 model has heterogeneous head dimensions "
                                    "(head_dim=256, global_head_dim=512). Forcing TRITON_ATTN "
                                    "backend"]) == "TRITON_ATTN"
    assert parse_attention_backend(["nothing here"]) is None


def test_records_file(tmp_path: Path) -> None:
    with ModelRecordWriter(tmp_path) as w:
        w.write({**base_record("m", "bf16", "decode", 128, 512, 1), "status": "failed"})
        w.write({**base_record("m", "bf16", "decode", 128, 512, 1), "status": "ok"})
    with model_path(tmp_path).open("a") as f:
        f.write('{"torn": ')  # a kill mid-write
    recs = load_model_records(tmp_path)
    assert len(recs) == 2 and [r["status"] for r in latest(recs)] == ["ok"]
    ModelRecordWriter(tmp_path).close()  # reopening drops the torn tail
    assert model_path(tmp_path).read_text().endswith("}\n")
    model_path(tmp_path).write_text('{"schema": 1}\n{}\n')
    with pytest.raises(DqprofError, match="lacks"):
        load_model_records(tmp_path)


# -- the runner, with stand-in workers ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # one layer, small vocab: the runner only reads headers
    out = tmp_path_factory.mktemp("tiny") / "bf16"
    synthesize("gemma-4-e4b", out, SynthOptions(layers=1, vocab=256))
    return out


FAKE_WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from dqprof.fullmodel.records import ModelRecordWriter, base_record
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec["quant"] == "bitsandbytes":
        time.sleep(30)  # hangs: the runner must kill it
    p = spec["points"][0]
    with ModelRecordWriter(Path(spec["run_dir"])) as w:
        w.write({**base_record(spec["model_name"], spec["quant"], p["workload"],
                               p["input_len"], p["output_len"], p["batch"]), "status": "ok"})
    Path(spec["info_path"]).write_text(json.dumps({"idle_power_w": 99.0}))
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 9 GiB", flush=True)
    sys.exit(1)
""")


def test_runner_records_crash_timeout_and_goes_on(tmp_path: Path, tiny_ckpt: Path) -> None:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    cfg = RunConfig(quants=parse_quants("bf16,bitsandbytes", tiny_ckpt),
                    workloads=W.parse_workloads("16:4"), batches=(1, 2), out=tmp_path / "run",
                    timeout_s=3.0, worker_cmd=[sys.executable, str(script)])
    t = time.time()
    counts = Runner(cfg).run()
    assert time.time() - t < 20
    recs = load_model_records(tmp_path / "run")
    by = {(r["quant"], r["batch"]): r for r in recs}
    assert by[("bf16", 1)]["status"] == "ok"
    assert by[("bf16", 2)]["status"] == "failed"
    assert "out of GPU memory" in by[("bf16", 2)]["reason"]
    assert by[("bitsandbytes", 1)]["status"] == "failed"
    assert "timed out" in by[("bitsandbytes", 1)]["reason"]
    assert counts == {"ok": 1, "skipped": 0, "failed": 3, "already": 0}
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    workers = run["sessions"][-1]["workers"]
    assert run["kind"] == "model" and workers["bf16"]["idle_power_w"] == 99.0
    assert workers["bitsandbytes"]["timed_out"] is True
    assert (tmp_path / "run" / "logs" / "bf16.log").exists()
    spec = json.loads((tmp_path / "run" / "logs" / "bf16.spec.json").read_text())
    assert spec["engine"]["max_num_seqs"] == 2 and spec["vllm_quantization"] is None
    # a rerun resumes: the ok point is not redone
    cfg.quants = parse_quants("bf16", tiny_ckpt)
    assert Runner(cfg).run()["already"] == 1


FAKE_VLLM = textwrap.dedent("""
    # A stand-in for vllm's offline API, as much as dqprof.fullmodel.worker touches.
    import logging
    import time
    from types import SimpleNamespace as NS

    __version__ = "0.0-fake"
    log = logging.getLogger("vllm.platforms.cuda")


    class SamplingParams:
        def __init__(self, max_tokens, ignore_eos, detokenize, temperature, top_p, top_k):
            assert ignore_eos and not detokenize and (temperature, top_p, top_k) == (1.0, 0.95, 64)
            self.max_tokens = max_tokens


    class LLM:
        def __init__(self, model, **kw):
            assert kw["skip_tokenizer_init"] and kw["enable_prefix_caching"] is False
            assert kw["dtype"] == "bfloat16" and kw["max_num_seqs"] == 2
            log.info("Using %s backend.", "AttentionBackendEnum.TRITON_ATTN")
            cfg = NS(attention_config=NS(backend=None),
                     model_config=NS(quantization=kw["quantization"], dtype="torch.bfloat16"),
                     scheduler_config=NS(max_num_batched_tokens=8192, max_num_seqs=2),
                     compilation_config=NS(mode=3, cudagraph_mode="FULL_AND_PIECEWISE",
                                           cudagraph_capture_sizes=[1, 2]),
                     cache_config=NS(cache_dtype="auto", num_gpu_blocks=100))
            self.llm_engine = NS(vllm_config=cfg, step=lambda: [])

        def generate(self, prompts, sp, use_tqdm):
            assert all(len(p["prompt_token_ids"]) == 16 for p in prompts)
            for _ in range(sp.max_tokens):  # as LLM._run_engine: one engine step per token
                self.llm_engine.step()
            time.sleep(0.01)
            return [NS(outputs=[NS(token_ids=[5] * sp.max_tokens)]) for _ in prompts]

        def apply_model(self, func):
            import torch
            return [func(torch.nn.Sequential())]
""")


def test_worker_end_to_end_with_stand_in_vllm(tmp_path: Path, tiny_ckpt: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake"
    (fake / "vllm").mkdir(parents=True)
    (fake / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.setenv("PYTHONPATH", f"{fake}:{repo}")
    cfg = RunConfig(quants=parse_quants("bf16", tiny_ckpt), workloads=W.parse_workloads("16:4"),
                    batches=(1, 2), out=tmp_path / "run", rule=W.WindowRule(0.05, 0),
                    timeout_s=120)
    assert Runner(cfg).run() == {"ok": 2, "skipped": 0, "failed": 0, "already": 0}, \
        (tmp_path / "run" / "logs" / "bf16.log").read_text()[-3000:]
    recs = load_model_records(tmp_path / "run")
    r = recs[1]
    assert r["engine"]["attention_backend"] == "TRITON_ATTN"
    assert r["engine"]["max_num_batched_tokens"] == 8192
    assert r["versions"]["vllm"] == "0.0-fake" and r["checkpoint"] == str(tiny_ckpt)
    assert r["windows"]["full"]["tokens_out"] == r["windows"]["full"]["calls"] * 2 * 4
    assert r["windows"]["full"]["seconds"] >= 0.05 and r["decode"]["j_per_token"] is None
    assert r["engine"]["vllm_kwargs"]["compilation_config"]["cudagraph_capture_sizes"] == [1, 2]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    worker = run["sessions"][-1]["workers"]["bf16"]
    assert worker["rc"] == 0 and worker["energy_note"] and worker["engine"]["dtype"]
    assert worker["phase"] == "done" and r["engine_start"]["s"] > 0
    assert "j" not in r["engine_start"]  # no NVML energy here
    assert r["engine"]["linear_methods"] == {}
    # no CUDA to synchronize here: the profile is a recorded failure, the point stays ok
    assert r["status"] == "ok" and r["in_situ"]["decode"]["status"] == "failed"
    assert r["in_situ"]["decode"]["reason"].startswith("profiler:")


def test_quant_names_and_checks(tiny_ckpt: Path) -> None:
    assert set(QUANTS) == {"bf16", "bitsandbytes", "gptq_marlin", "awq_marlin", "dqprof_nf4",
                           "fp8"}
    with pytest.raises(DqprofError, match="unknown quantization 'int3'"):
        parse_quants("bf16,int3", tiny_ckpt)
    # both load-time quantizations run on the bf16 checkpoint
    assert QUANTS["dqprof_nf4"] == ("dqprof_nf4", "bf16") and QUANTS["fp8"] == ("fp8", "bf16")
    gptq = CheckpointInfo("ck/g4-gptq", "g4", "gptq", {})
    for q in ("fp8", "dqprof_nf4"):
        with pytest.raises(DqprofError, match=f"--quant {q} runs on a bf16 checkpoint"):
            check_quant(q, gptq)
    with pytest.raises(DqprofError, match="pass --model"):
        parse_quants("bf16", None)
    assert parse_quants("bf16,gptq_marlin@x/y", tiny_ckpt)[1] == ("gptq_marlin", Path("x/y"))
    with pytest.raises(DqprofError, match="gptq checkpoint"):
        Runner(RunConfig(quants=parse_quants("gptq_marlin", tiny_ckpt),
                         workloads=W.parse_workloads("decode"), batches=(1,), out=Path("x")))


def test_failure_reason() -> None:
    assert failure_reason("", None, True, 42) == "worker timed out after 42 s"
    assert "out of GPU memory" in failure_reason("x\ntorch.OutOfMemoryError: CUDA", 1, False, 1)
    assert failure_reason("a\nValueError: bad thing\nshutting down", 1, False, 1) == \
        "worker exited with code 1: ValueError: bad thing"
    assert "without recording" in failure_reason("done", 0, False, 1)


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
         ) -> tuple[int, str]:
    """The real entry point (errors become one line and an exit code)."""
    from dqprof.cli import main

    monkeypatch.setattr(sys, "argv", ["dqprof", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


def test_cli_run_errors_and_dry_run(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    code, out = _cli(monkeypatch, capsys, "model", "run", "--model", str(tiny_ckpt), "--quant",
                     "int3")
    assert code == 2 and "unknown quantization 'int3'" in out and len(out.splitlines()) == 1
    r = CliRunner().invoke(app, ["model", "run", "--model", str(tiny_ckpt), "--quant",
                                 "bf16,bitsandbytes", "--dry-run", "--batch", "1,4"])
    assert r.exit_code == 0, r.output
    assert "decode b=4" in r.output and "prefill b=1" in r.output


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_cli_run_without_vllm_says_how_to_install(tiny_ckpt: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    code, out = _cli(monkeypatch, capsys, "model", "run", "--model", str(tiny_ckpt), "--quant",
                     "bf16", "-o", str(tmp_path / "run"))
    assert code == 3
    assert 'pip install -e ".[vllm]"' in " ".join(out.split())
    assert not (tmp_path / "run").exists()


def test_runner_keeps_out_of_kernel_run_folders(tmp_path: Path, tiny_ckpt: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text('{"kind": "kernels"}')
    cfg = RunConfig(quants=parse_quants("bf16", tiny_ckpt), workloads=W.parse_workloads("16:4"),
                    batches=(1,), out=tmp_path / "run", worker_cmd=["true"])
    with pytest.raises(DqprofError, match="'kernels' run"):
        Runner(cfg).run()
    assert not (tmp_path / "run" / "logs").exists()


def test_linear_kernel_from_logs() -> None:
    # the lines vLLM 0.20.2 printed on the H200 (profiles/h200/model-throughput/vllm-*.log)
    assert parse_linear_kernel(["Using MacheteLinearKernel for GPTQMarlinLinearMethod"]) == \
        "Machete"
    assert parse_linear_kernel(["The model is convertible to awq_marlin during runtime.",
                                "Using MacheteLinearKernel for AWQMarlinLinearMethod"]) == "Machete"
    assert parse_linear_kernel(["Using MarlinLinearKernel for GPTQMarlinLinearMethod"]) == "Marlin"
    assert parse_linear_kernel(["Using AttentionBackendEnum.TRITON_ATTN backend."]) is None
    # vLLM 0.20.2's FP8 selector (model_executor/kernels/linear/__init__.py) and our plugin
    assert parse_linear_kernel(["Selected CutlassFP8ScaledMMLinearKernel for "
                                "Fp8OnlineLinearMethod"]) == "CutlassFP8ScaledMM"
    assert parse_linear_kernel([KERNEL_LINE]) == "TritonNf4"


def test_fp8_needs_fp8_tensor_cores() -> None:
    assert fp8_unsupported("9.0") is None and fp8_unsupported("8.9") is None
    assert fp8_unsupported("10.0") is None
    why = fp8_unsupported("8.0")
    assert why and "8.0" in why and "8.9" in why
    assert fp8_unsupported(None) is None  # unknown: vLLM decides


def test_phase_display_names_each_phase_once_with_an_eta() -> None:
    lines: list[str] = []
    d = PhaseDisplay("dqprof_nf4", 4, lines.append, engine_start_s=120.0)
    d.update({}, 1.0)  # no info file yet: nothing to say
    d.update({"phase": "loading"}, 2.0)
    d.update({"phase": "loading"}, 3.0)  # no repeat
    d.update({"phase": "quantizing (dqprof_nf4)"}, 30.0)
    d.update({"phase": "measuring decode b=1", "points_done": 0}, 100.0)
    d.update({"phase": "measuring prefill b=1", "points_done": 1}, 130.0)
    assert lines[0] == "dqprof_nf4: loading (2 s in, ETA 2.0 min)"  # the last engine start
    assert lines[1].startswith("dqprof_nf4: quantizing (dqprof_nf4) (30 s in, ETA 1.5 min")
    assert "ETA" not in lines[2]  # no point done yet
    assert lines[3] == "dqprof_nf4: measuring prefill b=1 (130 s in, ETA 1.5 min)"  # 3 x 30 s
    assert len(lines) == 4
