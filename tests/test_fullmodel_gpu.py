"""GPU: a 2-layer synthetic Gemma 4 through vLLM under bf16, bitsandbytes, dqprof_nf4, fp8,
gptq_marlin and awq_marlin (eager, a few tokens), through the real runner and worker
processes; bf16 and dqprof_nf4 again under torch.compile and CUDA graphs with the in-situ step
profile; bitsandbytes against dqprof_nf4 logits (compiled, graphs) through the probe.

Run on the GPU machine: ``pytest -m gpu tests/test_fullmodel_gpu.py`` (about 8-10 minutes:
one vLLM import and engine start per quantization and mode). Skips without CUDA or vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dqprof.fullmodel.records import load_model_records
from dqprof.fullmodel.runner import RunConfig, Runner, parse_quants
from dqprof.fullmodel.synth import SynthOptions, synthesize
from dqprof.fullmodel.workload import WindowRule, parse_workloads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
]

QUANTS = ("bf16", "bitsandbytes", "dqprof_nf4", "fp8", "gptq_marlin", "awq_marlin")
GRAPH_QUANTS = ("bf16", "dqprof_nf4")
IN_LEN, OUT_LEN, BATCHES = 16, 8, (1, 4)
FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("g4gpu")
    for fmt in ("bf16", "gptq", "awq"):
        synthesize("gemma-4-e4b", root / fmt,
                   SynthOptions(fmt=fmt, layers=2, vocab=4096, device="cuda"))
    return root


def _run(root: Path, quants: str, out: str, mode: str) -> dict[str, list[dict]]:
    cfg = RunConfig(quants=parse_quants(quants, root / "bf16"),
                    workloads=parse_workloads(f"{IN_LEN}:{OUT_LEN}"), batches=BATCHES,
                    out=root / out, rule=WindowRule(min_s=0.0, min_ticks=0),
                    engine_mode=mode, gpu_memory_utilization=0.5, timeout_s=600)
    Runner(cfg, progress=print).run()
    recs: dict[str, list[dict]] = {}
    for r in load_model_records(root / out):
        recs.setdefault(r["quant"], []).append(r)
    return recs


@pytest.fixture(scope="module")
def records(ckpts: Path) -> dict[str, list[dict]]:
    return _run(ckpts, f"bf16,bitsandbytes,dqprof_nf4,fp8,gptq_marlin@{ckpts / 'gptq'},"
                       f"awq_marlin@{ckpts / 'awq'}", "run", "eager")


@pytest.fixture(scope="module")
def graph_records(ckpts: Path) -> dict[str, list[dict]]:
    return _run(ckpts, ",".join(GRAPH_QUANTS), "run-graphs", "default")


def _probe(ckpt: Path, quant: str, out: Path) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-m", "dqprof.fullmodel.probe", str(ckpt), quant,
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("quant", QUANTS)
def test_generation_returns_the_requested_tokens(records: dict[str, list[dict]],
                                                 quant: str) -> None:
    recs = records[quant]
    if quant == "fp8" and not FP8:
        assert all(r["status"] == "skipped" and "FP8" in r["reason"] for r in recs)
        return
    assert [r["batch"] for r in recs] == list(BATCHES)
    for r in recs:
        assert r["status"] == "ok", r.get("reason")
        full, pre = r["windows"]["full"], r["windows"]["prefill"]
        assert full["tokens_out"] == full["calls"] * r["batch"] * OUT_LEN
        assert pre["tokens_out"] == pre["calls"] * r["batch"]
        assert full["tokens_in"] == full["calls"] * r["batch"] * IN_LEN
        assert r["tokens_per_s"] > 0


def test_engine_facts_are_recorded(records: dict[str, list[dict]]) -> None:
    r = records["bf16"][0]
    assert r["engine"]["attention_backend"], r["engine"].get("attention_log")
    assert r["versions"]["vllm"] and r["versions"]["torch"]
    assert records["gptq_marlin"][0]["engine"]["quantization"] == "gptq_marlin"
    assert records["awq_marlin"][0]["engine"]["quantization"] == "awq_marlin"
    assert records["bitsandbytes"][0]["engine"]["quantization"] == "bitsandbytes"
    if FP8:
        fp8 = records["fp8"][0]["engine"]
        assert fp8["quantization"] == "fp8"
        assert fp8["linear_kernel"], fp8.get("attention_log")  # e.g. CutlassFP8ScaledMM
    nf4 = records["dqprof_nf4"][0]["engine"]
    assert nf4["quantization"] == "dqprof_nf4" and nf4["linear_kernel"] == "TritonNf4"
    assert not nf4["dqprof_nf4"]["left_bf16"]  # every Gemma 4 linear has K % 64 == 0


def test_engine_start_is_metered(records: dict[str, list[dict]]) -> None:
    for q in ("bf16", "dqprof_nf4"):
        start = records[q][0]["engine_start"]
        assert start["s"] > 0
        if "j" in start:  # NVML energy counter present
            assert start["j"] > 0


def test_dqprof_nf4_quantizes_what_bitsandbytes_quantizes(records: dict[str, list[dict]]
                                                          ) -> None:
    bnb = records["bitsandbytes"][0]["engine"]["linear_methods"]
    ours = records["dqprof_nf4"][0]["engine"]["linear_methods"]
    assert ours["DqprofNf4LinearMethod"] == bnb["BitsAndBytesLinearMethod"]
    assert {k: v for k, v in ours.items() if k != "DqprofNf4LinearMethod"} == \
        {k: v for k, v in bnb.items() if k != "BitsAndBytesLinearMethod"}  # embeddings bf16


def _centered_cos(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a), torch.tensor(b)
    return float(torch.nn.functional.cosine_similarity(x - x.mean(), y - y.mean(), dim=0))


def test_dqprof_nf4_logits_match_bitsandbytes(ckpts: Path, tmp_path: Path) -> None:
    # compiled, CUDA graphs: the custom op as vLLM captures it; step 0 is a prefill of the 4
    # prompts (M = 64), later steps decode at M = 4, compared while the greedy tokens agree
    bnb = _probe(ckpts / "bf16", "bitsandbytes", tmp_path / "bnb.json")
    ours = _probe(ckpts / "bf16", "dqprof_nf4", tmp_path / "nf4.json")
    assert ours["linear_methods"]["DqprofNf4LinearMethod"] == \
        bnb["linear_methods"]["BitsAndBytesLinearMethod"]
    compared = 0
    for p in range(len(bnb["tokens"])):
        for s in range(len(bnb["logits"][p])):
            cos = _centered_cos(bnb["logits"][p][s], ours["logits"][p][s])
            assert cos >= 0.99, (p, s, cos)
            compared += 1
            if bnb["tokens"][p][s] != ours["tokens"][p][s]:
                break  # the contexts differ from here on
    assert compared >= len(bnb["tokens"])  # at least every prompt's prefill step


@pytest.mark.parametrize("quant", GRAPH_QUANTS)
def test_in_situ_step_is_accounted_for(graph_records: dict[str, list[dict]],
                                       quant: str) -> None:
    for r in graph_records[quant]:
        assert r["status"] == "ok", r.get("reason")
        assert r["engine"]["cudagraph_mode"], r["engine"]
        for phase in ("decode", "prefill"):
            p = r["in_situ"][phase]
            assert p["status"] == "ok", p.get("reason")
            assert "forward passes x" in p["assignment"], p["assignment"]
            # named categories + device idle cover >= 95 % of the step's span
            assert p["named_fraction"] >= 0.95, (p["categories"], p["other_kernels"])
            assert p["linear_by_group"]["mlp.gate_up"] > 0 and p["categories"]["attention"] > 0
        assert r["in_situ"]["decode"]["tokens_per_step"] == r["batch"]
