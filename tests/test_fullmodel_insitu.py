"""In-situ step profiles on CPU: a recorded-shape trace (tests/data/vllm_decode_trace.json) ->
device time per category per step, linear kernels matched to layers, failures and cuts.

The fixture is shaped like torch.profiler's Chrome trace: two decode forward passes (one CUDA
graph launch each) of a 2-layer Gemma 4 (a sliding and a full layer) under bitsandbytes, with
kernel names as vLLM 0.20.2, torch, cuBLAS and bitsandbytes give them; every kernel is
followed by 1 us of idle, steps by 20 us more. Per forward pass: 65 kernels, 214.5 us of
kernel time, 150 us of it in the 14 linear calls.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from dqprof.fullmodel.insitu import (
    UNASSIGNED,
    analyze,
    kernels_from_trace,
    linear_runs,
    linear_sites,
)
from dqprof.fullmodel.stepprof import (
    ProfileOptions,
    StepTap,
    Window,
    decode_window,
    prefill_steps,
    prefill_window,
    profile_call,
)
from dqprof.models.config import load_config

TRACE = Path(__file__).parent / "data" / "vllm_decode_trace.json"
US = 1e-6


@pytest.fixture(scope="module")
def trace() -> dict:
    return json.loads(TRACE.read_text())


@pytest.fixture(scope="module")
def sites() -> list:
    base = load_config("gemma-4-e4b")
    fields = {**base.fields, "num_hidden_layers": 2,
              "layer_types": ["sliding_attention", "full_attention"]}
    return linear_sites(replace(base, fields=fields))


def test_sites_follow_the_layer_order(sites: list) -> None:
    names = [s.name for s in sites]
    assert names[0] == "ple.per_layer_model_projection" and names[-1] == "lm_head"
    assert names[1:7] == ["sliding.qkv_proj", "sliding.o_proj", "mlp.gate_up_proj",
                          "mlp.down_proj", "ple.per_layer_input_gate",
                          "ple.per_layer_projection"]
    assert names[7:9] == ["full.qkv_proj", "full.o_proj"] and len(names) == 14
    full = linear_sites(load_config("gemma-4-e4b"))
    assert len(full) == 1 + 6 * 42 + 1
    assert [s.name for s in full[6 * 5 + 1:6 * 5 + 3]] == ["full.qkv_proj", "full.o_proj"]


def test_trace_reading(trace: dict) -> None:
    kernels, launches = kernels_from_trace(trace)
    assert len(kernels) == 130 and launches == 2
    assert all(a.ts <= b.ts for a, b in zip(kernels, kernels[1:], strict=False))
    runs = linear_runs(kernels)
    assert len(runs) == 28
    # bitsandbytes' q, k, v GEMVs and their copies into the fused output: one linear call
    qkv = [kernels[i].category for i in runs[1]]
    assert qkv == ["gemm", "cast/copy"] * 3


def test_step_breakdown(trace: dict, sites: list) -> None:
    p = analyze(trace, sites, "decode", engine_steps=2, host_s=600 * US, tokens_in_window=None)
    assert p.status == "ok" and p.steps == 2 and p.kernels == 130 and p.graph_launches == 2
    assert "2 forward passes x 14" in p.assignment
    g = {k: round(v / US, 6) for k, v in p.linear_by_group.items()}
    assert g == {"ple": 18.0, "attn.qkv": 28.0, "attn.o": 8.0, "mlp.gate_up": 52.0,
                 "mlp.down": 24.0, "lm_head": 20.0}
    assert p.linear_by_layer["sliding.qkv_proj"] == pytest.approx(14 * US)
    assert p.linear_by_layer["full.qkv_proj"] == pytest.approx(14 * US)
    c = {k: round(v / US, 6) for k, v in p.categories.items()}
    assert c == {"attention": 16.0, "norm/elementwise": 31.0, "gather": 8.0, "sampling": 6.0,
                 "cast/copy": 3.0, "other": 0.5}
    assert p.other_kernels == {"void dqprof_fixture_unnamed_kernel<int>(int*)":
                               pytest.approx(0.5 * US)}  # what to name next
    assert p.linear_kernels["gemm"] == pytest.approx(140 * US)  # + 10 us of shard copies
    assert p.linear_kernels["cast/copy"] == pytest.approx(10 * US)
    assert p.busy_s == pytest.approx(214.5 * US)
    assert p.span_s == pytest.approx((2 * 214.5 + 2 * 64 + 21) / 2 * US)
    assert p.idle_s == pytest.approx(p.span_s - p.busy_s)
    assert p.host_s == pytest.approx(300 * US) and p.linear_calls_per_step == 14
    assert p.named_fraction == pytest.approx((214.5 - 0.5 + p.idle_s / US) / (p.span_s / US))
    total = p.linear_s + sum(p.categories.values())
    assert total == pytest.approx(p.busy_s)  # no overlap in the fixture


def test_unmatched_linears_are_measured_not_assigned(trace: dict, sites: list) -> None:
    events = list(trace["traceEvents"])
    gemv = [i for i, e in enumerate(events) if "gemv2T" in e.get("name", "")]
    del events[gemv[-1]]  # one linear call fewer: 27 runs for 2 x 14 sites
    p = analyze({"traceEvents": events}, sites, "decode", engine_steps=2, host_s=0.0)
    assert p.status == "ok" and "not a multiple" in p.assignment and p.steps == 2
    assert set(p.linear_by_group) == {UNASSIGNED} and not p.linear_by_layer
    assert p.linear_s == pytest.approx((300 - 2) / 2 * US)


def test_cut_trace_keeps_whole_forward_passes(trace: dict, sites: list) -> None:
    whole = analyze(trace, sites, "decode", 2, 0.0)
    cut = analyze(trace, sites, "decode", 2, 0.0, max_kernels=100)
    assert cut.cut and "first 100 of 130" in cut.cut and "1 whole forward passes" in cut.cut
    assert cut.steps == 1
    assert cut.linear_by_group == pytest.approx(whole.linear_by_group)


def test_profiler_that_sees_only_graph_launches(trace: dict, sites: list) -> None:
    launches = [e for e in trace["traceEvents"] if e.get("cat") == "cuda_runtime"]
    p = analyze({"traceEvents": launches}, sites, "decode", 2, 0.0)
    assert p.status == "failed" and "2 CUDA graph launches" in p.reason
    p = analyze({"traceEvents": []}, sites, "prefill", 2, 0.0)
    assert p.status == "failed" and "no GPU kernel" in p.reason
    norms = [e for e in trace["traceEvents"] if "rms_norm" in e.get("name", "")]
    p = analyze({"traceEvents": norms + launches}, sites, "decode", 2, 0.0)
    assert p.status == "failed" and "no GEMM" in p.reason and "graph launches" in p.reason


def test_windows() -> None:
    assert prefill_steps(8, 128, 8192) == 1 and prefill_steps(128, 2048, 16384) == 16
    w = decode_window(8, 128, 512, 8192, 8)
    assert (w.start, w.steps) == (1 + (511 - 8) // 2, 8)  # the middle of the output
    assert decode_window(1, 16, 4, None, 8).steps == 3  # no more than the call decodes
    p = prefill_window(128, 2048, 16384, 4)
    assert (p.start, p.steps, p.tokens) == (0, 4, 4 * 16384)
    assert prefill_window(8, 2048, 16384, 4).tokens == 8 * 2048


class FakeEngine:
    def __init__(self) -> None:
        self.calls = 0

    def step(self) -> list:
        self.calls += 1
        return []


class FakeProfiler:
    def __init__(self, log: list, fail: bool = False) -> None:
        self.log, self.fail = log, fail

    def start(self) -> None:
        if self.fail:
            raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")
        self.log.append("start")

    def stop(self) -> None:
        self.log.append("stop")

    def export_chrome_trace(self, path: str) -> None:
        Path(path).write_text(TRACE.read_text())


def test_step_tap_profiles_the_asked_steps(tmp_path: Path, sites: list) -> None:
    eng, log = FakeEngine(), []
    orig = eng.step

    def run() -> None:
        for _ in range(10):
            log.append(f"step{eng.calls}")
            eng.step()

    prof = profile_call(eng, run, Window(3, 4), sites, "decode", ProfileOptions(),
                        trace_path=tmp_path / "t.json", tokens_per_step=8.0,
                        make_profiler=lambda: FakeProfiler(log),
                        sync=lambda: log.append("sync"))
    assert log[:8] == ["step0", "step1", "step2", "step3", "sync", "start", "step4", "step5"]
    assert log[log.index("step6") + 1:log.index("step6") + 3] == ["sync", "stop"]
    assert eng.step == orig and eng.calls == 10  # the engine is left as it was
    assert prof.status == "ok" and prof.engine_steps == 4 and prof.tokens_per_step == 8.0
    assert not (tmp_path / "t.json").exists()  # traces are not kept unless asked
    kept = profile_call(eng, run, Window(0, 2), sites, "decode",
                        ProfileOptions(keep_traces=True), trace_path=tmp_path / "k.json",
                        make_profiler=lambda: FakeProfiler([]), sync=lambda: None)
    assert kept.status == "ok" and (tmp_path / "k.json").exists()


def test_step_tap_failures_are_recorded(sites: list) -> None:
    eng = FakeEngine()
    orig = eng.step
    short = profile_call(eng, lambda: [eng.step() for _ in range(2)], Window(5, 2), sites,
                         "decode", ProfileOptions(), make_profiler=lambda: FakeProfiler([]),
                         sync=lambda: None)
    assert short.status == "failed" and "made 2 engine steps" in short.reason
    bad = profile_call(eng, lambda: [eng.step() for _ in range(3)], Window(0, 2), sites,
                       "decode", ProfileOptions(),
                       make_profiler=lambda: FakeProfiler([], fail=True), sync=lambda: None)
    assert bad.status == "failed" and "CUPTI_ERROR_NOT_INITIALIZED" in bad.reason
    assert eng.step == orig


def test_call_ending_inside_the_window_keeps_what_was_profiled(sites: list) -> None:
    eng, log = FakeEngine(), []
    tap = StepTap(eng, Window(1, 5), lambda: log.append("sync"), lambda: FakeProfiler(log))
    with tap:
        for _ in range(3):
            eng.step()
    assert tap.profiled == 2 and log == ["sync", "start", "sync", "stop"]
    assert not math.isnan(tap.host_s)
