"""In-situ step profiles on CPU: a recorded-shape trace (tests/data/vllm_decode_trace.json) ->
device time per category per step, linear kernels matched to layers, failures and cuts.

The fixture is shaped like torch.profiler's Chrome trace: two decode forward passes (one CUDA
graph launch each) of a 2-layer Gemma 4 (a sliding and a full layer) under bitsandbytes, with
kernel names as vLLM 0.20.2, torch, cuBLAS and bitsandbytes give them; every kernel is
followed by 1 us of idle, steps by 20 us more. Per forward pass: 65 kernels, 214.5 us of
kernel time, 150 us of it in the 14 linear calls. The recorded traces (bf16 in vLLM on the
H200, ``profiles/h200/session9/traces-bf16.tar.gz``) check the compiled graph's order.
"""

from __future__ import annotations

import json
import math
import tarfile
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


# --- recorded traces: bf16 in vLLM 0.20.2 on the H200 (torch.compile + CUDA graphs) ---
RECORDED = (Path(__file__).parents[1] / "profiles" / "h200" / "session9"
            / "traces-bf16.tar.gz")


def _recorded(name: str) -> dict:
    with tarfile.open(RECORDED) as tar:
        return json.load(tar.extractfile(f"traces/{name}"))


@pytest.fixture(scope="module")
def full_sites() -> list:
    return linear_sites(load_config("gemma-4-e4b"))


def test_recorded_decode_step_is_assigned_layer_by_layer(full_sites: list) -> None:
    p = analyze(_recorded("bf16-decode-b1-decode.json"), full_sites, "decode", 8, 0.0)
    assert p.status == "ok" and p.steps == 8 and p.graph_launches == 8
    # 253 runs a pass: qkv_proj of layer 0 and per_layer_model_projection run back to back
    assert "8 forward passes x 253" in p.assignment and "split by kernel" in p.assignment
    assert set(p.linear_by_layer) == {s.name for s in full_sites}
    assert UNASSIGNED not in p.linear_by_group
    assert sum(p.linear_by_layer.values()) == pytest.approx(p.linear_s)
    # the pair's longer GEMM is the projection (10752 x 2560) against one qkv (3072 x 2560)
    runs = linear_runs(kernels_from_trace(_recorded("bf16-decode-b1-decode.json"))[0])
    assert len(runs) == 8 * (len(full_sites) - 1) and len(runs[0]) == 2
    assert p.named_fraction >= 0.95
    assert {"attention", "norm/elementwise", "sampling", "gather"} <= set(p.categories)


def test_recorded_prefill_step_splits_the_pair_across_a_memset(full_sites: list) -> None:
    trace = _recorded("bf16-prefill-b128-prefill.json")
    kernels, _ = kernels_from_trace(trace)
    first = linear_runs(kernels)[0]
    assert [kernels[i].category for i in first] == ["gemm", "cast/copy", "gemm"]
    p = analyze(trace, full_sites, "prefill", 4, 0.0, tokens_in_window=4 * 16384)
    assert p.status == "ok" and p.steps == 4 and "split by kernel" in p.assignment
    # prefill is compute-bound: the layers' time follows their FLOPs per pass
    per_call = {s.name: p.linear_by_layer[s.name] / sum(x.name == s.name for x in full_sites)
                for s in full_sites}
    assert per_call["mlp.gate_up_proj"] > per_call["mlp.down_proj"] > \
        per_call["sliding.qkv_proj"]
    assert p.tokens_per_step == 16384


def _pair_trace(kernels: list[tuple[str, float]]) -> dict:
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": 100.0 * i, "dur": d}
              for i, (n, d) in enumerate([("triton_red_fused_embedding_0", 0.5), *kernels,
                                          ("rms_norm_kernel", 1.0),
                                          ("nvjet_sm90_tst_lm_head", 5.0)])]
    return {"traceEvents": events}


def test_pair_run_one_gemv_per_shard_is_split_by_kernel(full_sites: list) -> None:
    """bitsandbytes: qkv_proj's three shard GEMVs (each copied into the fused output), then
    per_layer_model_projection's one, back to back: the shard count tells where qkv ends."""
    gemv, copy = "kgemm_4bit_inference_naive", "Memcpy DtoD (Device -> Device)"
    sites = [full_sites[0], full_sites[1], full_sites[-1]]
    run = [(gemv, 2.0), (copy, 0.25), (gemv, 2.0), (copy, 0.25), (gemv, 2.0), (copy, 0.25),
           (gemv, 18.0)]
    p = analyze(_pair_trace(run), sites, "decode", 1, 0.0)
    assert "split by kernel" in p.assignment
    assert p.linear_by_layer["ple.per_layer_model_projection"] == pytest.approx(18.0 * US)
    assert p.linear_by_layer[full_sites[1].name] == pytest.approx(6.75 * US)
    # the other order: the projection first
    p = analyze(_pair_trace(run[-1:] + run[:-1]), sites, "decode", 1, 0.0)
    assert p.linear_by_layer["ple.per_layer_model_projection"] == pytest.approx(18.0 * US)


def test_pair_without_one_lead_per_call_is_split_by_flops(full_sites: list) -> None:
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": float(t), "dur": d}
              for t, (n, d) in enumerate([("triton_red_fused_embedding_0", 0.5),
                                          ("kgemm_4bit_inference_naive", 3.0),
                                          ("Memcpy DtoD (Device -> Device)", 0.25),
                                          ("kgemm_4bit_inference_naive", 3.0),
                                          ("Memcpy DtoD (Device -> Device)", 0.25),
                                          ("kgemm_4bit_inference_naive", 3.0),
                                          ("kgemm_4bit_inference_naive", 9.0)])]
    events = [{**e, "ts": 100.0 * i} for i, e in enumerate(events)]
    # sites of a tiny model: the pair, then lm_head, one pass: 2 runs for 3 sites
    sites = [full_sites[0], full_sites[1], full_sites[-1]]
    events.append({"ph": "X", "cat": "kernel", "name": "rms_norm_kernel", "ts": 800.0,
                   "dur": 1.0})
    events.append({"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_lm_head", "ts": 900.0,
                   "dur": 5.0})
    p = analyze({"traceEvents": events}, sites, "decode", 1, 0.0)
    assert "by the two layers' FLOPs, an estimate" in p.assignment
    big, small = full_sites[0], full_sites[1]
    f = big.n * big.k / (big.n * big.k + small.n * small.k)
    pair = 3 * 3.0 + 2 * 0.25 + 9.0
    assert p.linear_by_layer[big.name] == pytest.approx(f * pair * US)
    assert p.linear_by_layer[small.name] == pytest.approx((1 - f) * pair * US)
    assert p.linear_by_layer["lm_head"] == pytest.approx(5.0 * US)
