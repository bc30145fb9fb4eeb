"""GPU: a 2-layer synthetic Gemma 4 through vLLM under bf16, bitsandbytes, gptq_marlin and
awq_marlin (eager, a few tokens), through the real runner and worker processes.

Run on the GPU machine: ``pytest -m gpu tests/test_fullmodel_gpu.py`` (about 3 minutes:
one vLLM import and engine start per quantization). Skips without CUDA or vLLM.
"""

from __future__ import annotations

import importlib.util

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

QUANTS = ("bf16", "bitsandbytes", "gptq_marlin", "awq_marlin")
IN_LEN, OUT_LEN, BATCHES = 16, 8, (1, 4)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("g4gpu")
    for fmt in ("bf16", "gptq", "awq"):
        synthesize("gemma-4-e4b", root / fmt,
                   SynthOptions(fmt=fmt, layers=2, vocab=4096, device="cuda"))
    quants = f"bf16,bitsandbytes,gptq_marlin@{root / 'gptq'},awq_marlin@{root / 'awq'}"
    cfg = RunConfig(quants=parse_quants(quants, root / "bf16"),
                    workloads=parse_workloads(f"{IN_LEN}:{OUT_LEN}"), batches=BATCHES,
                    out=root / "run", rule=WindowRule(min_s=0.0, min_ticks=0),
                    engine_mode="eager", gpu_memory_utilization=0.5, timeout_s=600)
    Runner(cfg, progress=print).run()
    out: dict[str, list[dict]] = {q: [] for q in QUANTS}
    for r in load_model_records(root / "run"):
        out[r["quant"]].append(r)
    return out


@pytest.mark.parametrize("quant", QUANTS)
def test_generation_returns_the_requested_tokens(records: dict[str, list[dict]],
                                                 quant: str) -> None:
    recs = records[quant]
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
