"""``dqprof.load_run(path)``: a run folder as one pandas DataFrame, for notebooks.

One row per record: the kernel points of kernels.jsonl (``kind == "kernel"``) and the
full-model records of model.jsonl (``kind == "model"``), in file order; every column is a
number or a string (no nested lists or dicts) and is described in ``COLUMNS``. A column that
belongs to one kind is empty (NaN/None) in rows of the other. ``df.attrs["run"]`` holds
run.json (environment, versions, ceilings, sessions), ``df.attrs["path"]`` the folder.

Kernel rows come from the report's own loader (``dqprof.analysis.frame.points_frame``: the
same figures and the same rule that blanks unusable energy), model rows from
``dqprof.fullmodel.records``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from dqprof.errors import DqprofError
from dqprof.measure.categories import SWEEP_CATEGORIES
from dqprof.results import KERNELS_FILE, dig, load_records, read_run

SHARED = {
    "kind": "kernel (one GEMM point of kernels.jsonl) or model (one vLLM run of model.jsonl)",
    "key": "the record's identity (what resume, merge and regress match on)",
    "model": "model name (bundled config or checkpoint's)",
    "status": "ok, skipped or failed",
    "reason": "why a point was skipped or failed (None when ok)",
    "power_w": "average board power in the energy window, W",
}
KERNEL = {
    "layer": "linear layer (e.g. mlp.gate_up_proj)",
    "group": "layer group (attn.qkv, attn.o, mlp.gate_up, mlp.down, ple, lm_head)",
    "n": "output features N", "k": "input features K", "m": "tokens per call M (0: M-independent)",
    "backend": "GEMM path (`dqprof backends`)", "variant": "options that differ from the "
    "path's defaults, and 'hot' for L2-resident weights ('' for the default)",
    "series": "backend[variant], the label plots use",
    "shards": "output sizes of a fused layer's shards, '+'-joined",
    "calls_per_token": "calls of this layer per decode token",
    "per_sequence": "True: runs once per sequence in prefill (lm_head)",
    "time_s": "median time per call, s", "time_spread": "IQR / median of the time samples",
    "energy_j": "energy per call, J, idle included (NaN where unmeasured or flagged unusable)",
    "energy_above_idle_j": "energy per call above idle power, J",
    "energy_flag": "why the energy window is suspect (None when clean)",
    "bytes": "minimum HBM bytes per call (dqprof.bytemodel)",
    "weight_bytes": "packed weight bytes", "scales_bytes": "scale/absmax bytes",
    "intermediate_bytes": "bytes an unfused path writes and reads back",
    "flops": "FLOPs per call", "intensity": "FLOPs per byte of the minimum traffic",
    "flop_per_s": "achieved FLOP/s", "bytes_per_s": "achieved bytes/s over the minimum traffic",
    **{f"kernel_{c.replace('/', '_')}_s": f"device time per call of the {c} kernels "
       f"(attribution; NaN without it)" for c in SWEEP_CATEGORIES},
}
MODEL = {
    "quant": "vLLM quantization (bf16, bitsandbytes, gptq_marlin, awq_marlin)",
    "workload": "decode (decode-heavy call), prefill (prefill-heavy) or IN:OUT",
    "batch": "sequences per call", "input_len": "prompt tokens per sequence",
    "output_len": "generated tokens per sequence",
    "j_per_output_token": "whole call's energy per generated token, J",
    "tokens_per_s": "whole call's generated tokens per second",
    "idle_power_w": "idle board power measured in the same run, W",
    **{f"{phase}_{f}": f"{phase} phase: {what}" for phase in ("decode", "prefill")
       for f, what in (("j_per_token", "energy per token, J (idle included)"),
                       ("j_per_token_above_idle", "energy per token above idle, J"),
                       ("s_per_token", "seconds per token"),
                       ("tokens_per_s", "tokens per second"))},
    "linear_kernel": "the linear kernel vLLM logged (e.g. Machete), None if not logged",
    "attention_backend": "vLLM's attention backend",
    "gpu": "GPU name (kernel rows: run.json's)",
}
COLUMNS: dict[str, str] = {**SHARED, **KERNEL, **MODEL}  # name -> what it holds
INTS = ("n", "k", "m", "calls_per_token", "batch", "input_len", "output_len")


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def kernel_rows(records: list[dict[str, Any]]) -> pd.DataFrame:
    from dqprof.analysis.frame import points_frame

    df = points_frame(records)
    df.insert(0, "kind", "kernel")
    df.insert(1, "key", [r["key"] for r in records])
    df.insert(2, "model", [r["model"] for r in records])
    df["shards"] = df["shards"].map(lambda s: "+".join(str(v) for v in s))
    for c in SWEEP_CATEGORIES:
        df[f"kernel_{c.replace('/', '_')}_s"] = [
            sum(_num(k.get("time_s")) for k in r["kernels"] if k.get("category") == c)
            if r.get("kernels") else math.nan for r in records]
    return df.drop(columns=["kernels"])


def model_rows(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in records:
        row = {"kind": "model", **{k: r.get(k) for k in ("key", "model", "status", "reason",
                                                        "quant", "workload", "gpu")},
               "batch": r["batch"], "input_len": r.get("input_len"),
               "output_len": r.get("output_len"), "power_w": _num(r.get("power_w")),
               "j_per_output_token": _num(r.get("j_per_output_token")),
               "tokens_per_s": _num(r.get("tokens_per_s")),
               "idle_power_w": _num(r.get("idle_power_w")),
               "linear_kernel": dig(r, "engine", "linear_kernel"),
               "attention_backend": dig(r, "engine", "attention_backend")}
        for phase in ("decode", "prefill"):
            for f in ("j_per_token", "j_per_token_above_idle", "s_per_token", "tokens_per_s"):
                row[f"{phase}_{f}"] = _num(dig(r, phase, f))
        rows.append(row)
    return pd.DataFrame(rows)


def load_run(path: Path | str, kind: str | None = None) -> pd.DataFrame:
    """The records of a run folder (kernels.jsonl and/or model.jsonl) as one DataFrame with
    the columns of ``COLUMNS``; ``kind`` "kernel" or "model" keeps only those rows."""
    from dqprof.fullmodel.records import MODEL_FILE, load_model_records

    path = Path(path)
    if path.is_file():  # a results file: its folder holds run.json
        folder, files = path.parent, {path.name}
    elif path.is_dir():
        folder, files = path, {f for f in (KERNELS_FILE, MODEL_FILE) if (path / f).exists()}
    else:
        raise DqprofError(f"{path}: no such run folder or results file")
    if kind not in (None, "kernel", "model"):
        raise DqprofError(f"kind is kernel, model or None (got '{kind}')")
    parts = []
    if KERNELS_FILE in files and kind in (None, "kernel"):
        recs = load_records(folder / KERNELS_FILE)
        if recs:
            parts.append(kernel_rows(recs).assign(gpu=dig(read_run(folder), "environment",
                                                          "gpu", "name")))
    if MODEL_FILE in files and kind in (None, "model"):
        recs = load_model_records(folder / MODEL_FILE)
        if recs:
            parts.append(model_rows(recs))
    if not files & {KERNELS_FILE, MODEL_FILE}:
        raise DqprofError(f"{path}: neither {KERNELS_FILE} nor {MODEL_FILE} (not a dqprof run)")
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    df = df.reindex(columns=list(COLUMNS))
    for c in INTS:  # whole numbers stay whole where the other kind leaves them empty
        df[c] = df[c].astype("Int64")
    df.attrs = {"run": read_run(folder), "path": str(folder)}
    return df
