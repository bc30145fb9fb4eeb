"""Run folders as pandas: one tidy row per record, the columns every analysis reads.

Loading is where bad input is caught: a folder without kernels.jsonl, or a profile written
under another schema version, is a ``DqprofError`` (exit 2) naming the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dqprof.errors import DqprofError
from dqprof.results import KERNELS_FILE, SCHEMA_VERSION, dig, load_records, read_run

REFERENCE = "bf16"  # the path every quantized path is compared with
DEQUANT = "bnb-dequant"  # the dequantize kernels alone (m=0, one record per layer)
NF4 = "bnb-nf4"  # the runtime-dequantization path the tool is about
DEQUANT_METERED = {NF4: DEQUANT}  # path -> backend that meters its dequantize kernels alone
KEY = ["layer", "m", "backend", "variant"]  # what runs are aligned on
# energy flags that make a figure unusable (kept: "few counter ticks", noted instead)
# "gpu idle": idle gaps inside the window would be charged to the calls
BAD_ENERGY = ("zero", "implausible", "gpu idle")
# a window whose GPU idled charged that idle to its calls: its J/call bounds the truth from above
BOUND_ENERGY = "gpu idle"


def default_profile() -> Path:
    """The committed H200 profile: ./profiles/h200 if present, else the checkout's own."""
    here = Path("profiles/h200")
    if (here / KERNELS_FILE).exists():
        return here
    return Path(__file__).resolve().parents[2] / "profiles" / "h200"


def notebook_run_dir() -> Path:
    """The run a notebook reads: $DQPROF_RUN when set (tests point it at a small run), else
    the committed H200 profile."""
    env = os.environ.get("DQPROF_RUN")
    path = Path(env) if env else default_profile()
    if not (path / KERNELS_FILE).exists():
        raise DqprofError(f"{path}: no {KERNELS_FILE}; set DQPROF_RUN to a run folder")
    return path


def series_label(backend: str, variant: str) -> str:
    return f"{backend}[{variant}]" if variant else backend


def reference_variant(variant: str) -> str:
    """The bf16 variant a series is compared with: hot runs against hot bf16, else default."""
    return "hot" if "hot" in str(variant).split(",") else ""


@dataclass
class Run:
    path: Path
    label: str
    info: dict[str, Any]
    records: list[dict[str, Any]]
    points: pd.DataFrame
    notes: list[str] = field(default_factory=list)  # what loading left out, and why

    @property
    def ok(self) -> pd.DataFrame:
        return self.points[self.points["status"] == "ok"]

    @property
    def ceilings(self) -> dict[str, float]:
        c = self.info.get("ceilings") or {}
        return {k: v for k, v in c.items() if isinstance(v, int | float) and v > 0}

    @property
    def gpu(self) -> str:
        env = self.info.get("environment") or {}
        gpu = env.get("gpu") or {}
        return gpu.get("name") or env.get("device") or "unknown device"

    @property
    def model(self) -> str:
        return str(self.info.get("model") or (self.records[0]["model"] if self.records else "?"))

    @property
    def series(self) -> list[str]:
        return series_order(self.points)

    @property
    def has_energy(self) -> bool:
        return bool(self.ok["energy_j"].notna().any())

    @property
    def has_kernels(self) -> bool:
        return bool(self.ok["kernels"].map(lambda k: bool(k)).any())




def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def points_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per record; figures as floats (NaN where absent), unusable energy as NaN."""
    rows = []
    for r in records:
        flag = dig(r, "energy", "flag")
        bad = bool(flag) and str(flag).startswith(BAD_ENERGY)
        rows.append({
            "layer": r["layer"], "group": r.get("group") or r["layer"], "n": r["n"], "k": r["k"],
            "m": int(r["m"]), "backend": r["backend"], "variant": r.get("variant") or "",
            "series": series_label(r["backend"], r.get("variant") or ""),
            "status": r["status"], "reason": r.get("reason"),
            "shards": tuple(r.get("shards") or (r["n"],)),
            "calls_per_token": r.get("calls_per_token", 1),
            "per_sequence": bool(r.get("per_sequence", False)),
            "time_s": _num(dig(r, "time", "median_s")),
            "time_spread": _num(dig(r, "time", "rel_spread")),
            "energy_j": math.nan if bad else _num(dig(r, "energy", "j_per_call")),
            "energy_above_idle_j": math.nan if bad else _num(dig(r, "energy",
                                                                  "j_per_call_above_idle")),
            "energy_bound_j": (_num(dig(r, "energy", "j_per_call"))
                               if bad and str(flag).startswith(BOUND_ENERGY) else math.nan),
            "energy_flag": flag, "power_w": _num(dig(r, "energy", "power_w")),
            "bytes": _num(dig(r, "traffic", "total")),
            "weight_bytes": _num(dig(r, "traffic", "weight")),
            "scales_bytes": _num(dig(r, "traffic", "scales")),
            "intermediate_bytes": _num(dig(r, "traffic", "intermediate")),
            "flops": _num(r.get("flops")), "intensity": _num(r.get("intensity")),
            "flop_per_s": _num(dig(r, "achieved", "flop_per_s")),
            "bytes_per_s": _num(dig(r, "achieved", "bytes_per_s")),
            "kernels": r.get("kernels"),
        })
    return pd.DataFrame(rows)  # record order kept: it is the sweep's (registry) order


def reference_of(points: pd.DataFrame) -> dict[str, str]:
    """Series -> the bf16 series it is compared with (hot runs with hot bf16)."""
    first = points.drop_duplicates("series")
    return {s: series_label(REFERENCE, reference_variant(v))
            for s, v in zip(first["series"], first["variant"], strict=True)}


def series_order(points: pd.DataFrame) -> list[str]:
    """Series in the order the sweep ran them (the backend registry's order), bf16 first."""
    first = points.drop_duplicates("series")
    return [s for _, s in sorted(zip(first["backend"] != REFERENCE, first["series"],
                                     strict=True), key=lambda t: t[0])]


def load_run(path: Path | str, label: str | None = None) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise DqprofError(f"{path}: no such run folder")
    if not (path / KERNELS_FILE).exists():
        raise DqprofError(f"{path}: no {KERNELS_FILE} (not a `dqprof bench` run folder, or the "
                          f"sweep recorded no point yet)")
    info = read_run(path)
    schema = info.get("schema", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        raise DqprofError(f"{path}: run.json has schema version {schema} (this dqprof reads "
                          f"{SCHEMA_VERSION}); use the dqprof release that wrote it")
    records = load_records(path)  # validates every record, schema included
    if not records:
        raise DqprofError(f"{path}/{KERNELS_FILE}: holds no records")
    points = points_frame(records)
    run = Run(path, label or path.name, info, records, points)
    flagged = points[points["energy_flag"].notna() & points["energy_j"].isna()]
    for _, p in flagged.iterrows():
        run.notes.append(f"{run.label}: energy of {p['layer']} {p['series']} m={p['m']} "
                         f"dropped ({p['energy_flag']})")
    return run


def load_runs(paths: list[Path | str]) -> list[Run]:
    """Several runs, labelled by folder name (with the parent where names repeat)."""
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths]
    labels = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{lab}#{i + 1}" for i, lab in enumerate(labels)]
    return [load_run(p, lab) for p, lab in zip(paths, labels, strict=True)]
