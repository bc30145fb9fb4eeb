"""Synthetic, schema-valid kernel records for the analysis tests, made by a small cost model.

Figures come from formulas (bytes over a bandwidth, FLOPs over a rate, energy = idle power x
time + J/byte x bytes + J/FLOP x FLOPs), never typed by hand; the byte counts come from
dqprof.bytemodel like the real sweep's. Tests assert what the analysis recomputes from these
records, not the numbers themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dqprof import bytemodel
from dqprof.models.config import load_config
from dqprof.models.shapes import LinearShape, linear_shapes, select_shapes
from dqprof.results import SCHEMA_VERSION, point_key

BANDWIDTH = 4.0e12  # bytes/s the model's kernels stream at
PEAK = 6.0e14  # FLOP/s
LAUNCH_S = 3e-6  # fixed cost per kernel
IDLE_W = 120.0
J_PER_BYTE = 50e-12
J_PER_FLOP = 0.5e-12
NF4_FUSED_BELOW = 16  # the model's bnb-nf4 takes the fused gemv path below this M
BACKENDS = ("bf16", "bnb-nf4", "bnb-dequant", "marlin-gptq")
FUSED_INT4 = {"marlin-gptq": None, "marlin-awq": "int4", "tinygemm-int4": "bf16"}  # zero points
MS = (1, 16, 256, 2048)


def _kernel(name: str, category: str, nbytes: float, flops: float = 0.0) -> dict[str, Any]:
    return {"name": name, "category": category, "count": 1.0,
            "time_s": LAUNCH_S + nbytes / BANDWIDTH + flops / PEAK}


def _kernels(backend: str, s: LinearShape, m: int) -> tuple[bytemodel.Traffic, list[dict]]:
    n, k, flops = s.n, s.k, bytemodel.gemm_flops(m, s.n, s.k)
    if backend == "bf16":
        t = bytemodel.bf16_gemm(m, n, k)
        return t, [_kernel("nvjet_bf16_gemm", "gemm", t.total, flops)]
    if backend in FUSED_INT4:
        t = bytemodel.int4_grouped(m, n, k, FUSED_INT4[backend])
        return t, [_kernel(f"{backend}_gemm", "gemm", t.total, flops)]
    if backend == "triton-nf4":
        t = bytemodel.nf4_fused(m, n, k)
        return t, [_kernel("nf4_fused_gemm", "gemm", t.total, flops)]
    if backend == "bnb-dequant":
        t = bytemodel.Traffic()
        for shard in s.shards:
            t = t + bytemodel.nf4_dequantize(shard, k)
        return t, [_kernel("kDequantizeBlockwise", "dequant", t.total)]
    fused = m < NF4_FUSED_BELOW
    t = bytemodel.bnb_nf4_layer(m, s.shards, k, fused)
    ks = []
    for shard in s.shards:
        f = bytemodel.gemm_flops(m, shard, k)
        if fused:
            ks.append(_kernel("kgemm_4bit_inference", "gemm",
                              bytemodel.bnb_nf4_shard(m, shard, k, True).total, f))
        else:
            ks.append(_kernel("kDequantizeBlockwise", "dequant",
                              bytemodel.nf4_dequantize(shard, k).total))
            ks.append(_kernel("nvjet_bf16_gemm", "gemm",
                              bytemodel.bf16_gemm(m, shard, k).total, f))
    ks.append(_kernel("elementwise_copy", "cast/copy", 4 * m * n))
    return t, ks


def _energy(t: float, nbytes: float, flops: float) -> dict[str, Any]:
    above = J_PER_BYTE * nbytes + J_PER_FLOP * flops
    total = IDLE_W * t + above
    return {"j_per_call": total, "j_per_call_above_idle": above, "power_w": total / t,
            "idle_power_w": IDLE_W, "window_s": 1.0, "ticks": 10, "calls": int(1 / t),
            "s_per_call_in_window": t, "flag": None}


def record(model: str, s: LinearShape, backend: str, m: int, *, energy: bool = True,
           kernels: bool = True, variant: str = "", time_scale: float = 1.0) -> dict[str, Any]:
    """One record as the sweep writes it (skipped where the real sweep skips)."""
    m = 0 if backend == "bnb-dequant" else m
    base = {"schema": SCHEMA_VERSION, "kind": "kernel",
            "key": point_key(model, s.name, m, backend, variant), "model": model,
            "layer": s.name, "group": s.group, "n": s.n, "k": s.k, "shards": list(s.shards),
            "calls_per_token": s.calls_per_token, "per_sequence": s.per_sequence, "m": m,
            "backend": backend, "variant": variant, "dtype": "bfloat16", "device": "cuda",
            "time_utc": "2026-12-01T00:00:00+00:00"}
    if backend != "bf16" and not s.quantized:
        return {**base, "status": "skipped",
                "reason": f"{s.name} stays bf16 under every vLLM quantization"}
    traffic, ks = _kernels(backend, s, m)
    t = sum(k["time_s"] for k in ks) * time_scale
    flops = 0 if backend == "bnb-dequant" else bytemodel.gemm_flops(m, s.n, s.k)
    return {**base, "status": "ok", "reason": None, "rel_err": 1e-3,
            "time": {"median_s": t, "min_s": t, "max_s": t, "q1_s": t, "q3_s": t,
                     "samples": 5, "calls_per_sample": 10, "rel_spread": 0.0},
            "energy": _energy(t, traffic.total, flops) if energy else None,
            "kernels": ks if kernels else None, "traffic": traffic.as_dict(), "flops": flops,
            "intensity": flops / traffic.total if traffic.total else None,
            "achieved": {"bytes_per_s": traffic.total / t, "flop_per_s": flops / t,
                         "frac_bandwidth": None, "frac_flops": None}}


def records(model: str = "gemma-4-e4b", shapes: str | None = None,
            backends: tuple[str, ...] = BACKENDS, ms: tuple[int, ...] = MS,
            **kw: Any) -> list[dict[str, Any]]:
    cfg = load_config(model)
    out = []
    for s in select_shapes(linear_shapes(cfg), shapes):
        for b in backends:
            for m in ((0,) if b == "bnb-dequant" else ms):
                out.append(record(cfg.name, s, b, m, **kw))
    return out


def run_info(ceilings: bool = True, model: str = "gemma-4-e4b") -> dict[str, Any]:
    info: dict[str, Any] = {"schema": SCHEMA_VERSION, "kind": "kernels", "model": model,
                            "environment": {"device": "cuda", "gpu": {"name": "Synthetic GPU"}},
                            "idle_power_w": IDLE_W}
    if ceilings:
        info["ceilings"] = {"copy_bytes_per_s": BANDWIDTH, "bf16_flop_per_s": PEAK}
    return info


def write_run(folder: Path, recs: list[dict[str, Any]], info: dict[str, Any] | None = None
              ) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(info if info is not None else run_info()))
    (folder / "kernels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder


TINY = "tests/data/tiny-llama.json"  # 5 layers: fast to analyse and plot


def make_run(recs: list[dict[str, Any]], info: dict[str, Any] | None = None,
             label: str = "synthetic"):
    """An in-memory Run, as load_run would build it from a folder."""
    from dqprof.analysis.frame import Run, points_frame

    return Run(Path(label), label, info if info is not None else run_info(), recs,
               points_frame(recs))


def cpu_like(model: str = TINY) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What a CPU run records: no energy, no kernels, no ceilings."""
    return records(model, energy=False, kernels=False), run_info(ceilings=False)
