"""The format or the path: how much of bnb-nf4's excess over the best fused int4 kernel is
bitsandbytes' execution path, and how much is the NF4 format itself.

For a figure F (time or energy per call, per token, or J/token of the full model):
  gap    = F(bnb-nf4)    - F(best)        best: the cheapest fused int4 path with a usable F
  path   = F(bnb-nf4)    - F(triton-nf4)  the same NF4 bytes, bitsandbytes' kernels vs fused
  format = F(triton-nf4) - F(best)        NF4 through a fused kernel vs stored int4
so path + format = gap. Shares are of the gap, signed, and only where the gap is positive.
A negative path (triton-nf4 slower than bitsandbytes) makes the format part exceed the gap:
it is then an upper bound set by this kernel, not the format's own cost. A negative format
(triton-nf4 beats every int4 path there) means the format costs nothing at that point.

At a point (layer, M) best is the cheapest int4 path there. Per token (breakdown's scenarios)
the split is of the all-linears totals, best being the one int4 path with the lowest total (an
engine runs one kernel family, not a per-layer mix). In the full model (model.jsonl) the roles
are vLLM's bitsandbytes, dqprof_nf4 and the better of gptq_marlin/awq_marlin, by the J/token
of the phase each workload is judged by (fullmodel.headline). Energy flagged doubtful is
already NaN in the points (frame.BAD_ENERGY), so it never enters a split.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dqprof.analysis.breakdown import DECODE, PREFILL, Scenario, totals, upper_bounds
from dqprof.analysis.frame import NF4, series_label

FUSED_NF4 = "triton-nf4"
SAME_STATS = "stats=fp32"  # triton-nf4 on the statistics bnb-nf4 reads (see roles_of)
INT4 = ("marlin-gptq", "marlin-awq", "machete-gptq", "machete-awq", "tinygemm-int4",
        "gemlite-int4")
# what a missing path needs, for the section's notes
NEEDS = {NF4: "the bitsandbytes package (gpu extra)", FUSED_NF4: "triton (gpu extra)",
         "marlin-gptq": "vLLM (vllm extra)", "marlin-awq": "vLLM (vllm extra)",
         "machete-gptq": "vLLM on a Hopper GPU", "machete-awq": "vLLM on a Hopper GPU",
         "tinygemm-int4": "torch on CUDA", "gemlite-int4": "the gemlite package (gpu extra)"}
MODEL_NF4, MODEL_FUSED = "bitsandbytes", "dqprof_nf4"
MODEL_INT4 = ("gptq_marlin", "awq_marlin")
MODEL_NEEDS = {MODEL_NF4: "`dqprof model run --quant bitsandbytes@<bf16 checkpoint>`",
               MODEL_FUSED: "`dqprof model run --quant dqprof_nf4@<bf16 checkpoint>` "
                            "(dqprof's vLLM plugin)",
               "gptq_marlin": "`dqprof model run --quant gptq_marlin@<GPTQ checkpoint>`",
               "awq_marlin": "`dqprof model run --quant awq_marlin@<AWQ checkpoint>`"}
TOKEN_SCENARIOS: tuple[Scenario, ...] = (*DECODE, PREFILL[-1])  # the per-token energy's
COLUMNS = ["nf4", "fused", "best", "best_series", "gap", "path", "format", "path_share",
           "format_share", "reading", "missing", "bound"]


@dataclass(frozen=True)
class Roles:
    """The series (or full-model quantizations) that play each part of the split."""
    nf4: str
    fused: str
    int4: tuple[str, ...]

    @property
    def all(self) -> tuple[str, ...]:
        return (self.nf4, self.fused, *self.int4)


def roles_of(points: pd.DataFrame) -> Roles:
    """Series with bnb-nf4's variant (the default, or 'hot' in a hot run): a path run with
    other options is another kernel and plays no part. One exception, for the same bytes:
    bnb-nf4 reads fp32 absmax (vLLM undoes the nested statistics at load), triton-nf4 by
    default the nested form (1 byte per 64 weights against 4), so where the run also holds
    triton-nf4 with SAME_STATS, that series is the fused NF4 kernel of the split."""
    nf4 = points[points["backend"] == NF4]
    variant = str(nf4["variant"].iloc[0]) if len(nf4) else ""
    fused = series_label(FUSED_NF4, variant)
    same = series_label(FUSED_NF4, ",".join(sorted(filter(None, (variant, SAME_STATS)))))
    if (points["series"] == same).any() and (points[points["series"] == same]["status"]
                                             == "ok").any():
        fused = same
    return Roles(series_label(NF4, variant), fused,
                 tuple(series_label(b, variant) for b in INT4))


def reading(gap: float, path: float, fmt_part: float) -> str:
    """How to read one split: 'split', 'path negative', 'format free' or 'no gap'."""
    if not all(math.isfinite(v) for v in (gap, path, fmt_part)):
        return ""
    if gap <= 0:
        return "no gap"
    if path < 0:
        return "path negative"
    if fmt_part <= 0:
        return "format free"
    return "split"


def split(nf4: float, fused: float, candidates: dict[str, float]) -> dict:
    """One split from finite figures (NaN where absent); best over ``candidates``."""
    usable = {k: v for k, v in candidates.items() if v is not None and math.isfinite(v)}
    best_series = min(usable, key=usable.__getitem__) if usable else ""
    best = usable[best_series] if usable else math.nan
    gap, path, fmt_part = nf4 - best, nf4 - fused, fused - best
    ok = math.isfinite(gap) and gap > 0
    return {"nf4": nf4, "fused": fused, "best": best, "best_series": best_series, "gap": gap,
            "path": path, "format": fmt_part,
            "path_share": path / gap if ok else math.nan,
            "format_share": fmt_part / gap if ok else math.nan,
            "reading": reading(gap, path, fmt_part), "bound": ""}


def _missing(named: Iterable[tuple[str, str]]) -> str:
    return "; ".join(f"{who}: {why}" for who, why in named)


def _why(points: pd.DataFrame, series: str, layer: str, m: int, metric: str) -> str:
    """Why ``series`` has no usable ``metric`` at (layer, m)."""
    recs = points[(points["series"] == series) & (points["layer"] == layer)
                  & (points["m"] == m)]
    if recs.empty:
        return "not measured"
    r = recs.iloc[-1]
    if r["status"] != "ok":
        return f"{r['status']} ({r['reason']})" if r["reason"] else str(r["status"])
    if metric == "energy_j" and r["energy_flag"]:
        return f"energy dropped ({r['energy_flag']})"
    return "no energy figure" if metric == "energy_j" else "no time figure"


def point_splits(points: pd.DataFrame, metric: str, roles: Roles | None = None
                 ) -> pd.DataFrame:
    """One row per (layer, M) bnb-nf4 ran at: the split of its per-call ``metric``."""
    roles = roles or roles_of(points)
    ok = points[points["status"] == "ok"]
    value = {(r.series, r.layer, r.m): getattr(r, metric) for r in ok.itertuples()}
    at = points[(points["series"] == roles.nf4) & (points["m"] > 0)
                & (points["status"] != "skipped")]  # skipped: the layer stays bf16
    rows = []
    for p in at.drop_duplicates(["layer", "m"]).itertuples():
        def v(s: str, p=p) -> float:
            x = value.get((s, p.layer, p.m), math.nan)
            return x if math.isfinite(x) else math.nan

        row = split(v(roles.nf4), v(roles.fused), {s: v(s) for s in roles.int4})
        gone = [(s, _why(points, s, p.layer, p.m, metric)) for s in (roles.nf4, roles.fused)
                if math.isnan(v(s))]
        if not row["best_series"]:
            gone.append(("fused int4", "no path with a usable figure"))
        rows.append({"layer": p.layer, "group": p.group, "m": p.m, **row,
                     "missing": _missing(gone)})
    return pd.DataFrame(rows, columns=["layer", "group", "m", *COLUMNS])


def token_splits(per_token: dict[Scenario, pd.DataFrame], roles: Roles,
                 scenarios: tuple[Scenario, ...] = TOKEN_SCENARIOS) -> pd.DataFrame:
    """One row per scenario: the split of all linears' per-token figure (breakdown's rows;
    a path left out of a scenario has no total there)."""
    rows = []
    for sc in scenarios:
        t = totals(per_token.get(sc, pd.DataFrame()))
        tot = t["total"] if not t.empty else pd.Series(dtype=float)
        row = split(float(tot.get(roles.nf4, math.nan)), float(tot.get(roles.fused, math.nan)),
                    {s: float(tot[s]) for s in roles.int4 if s in tot.index})
        gone = [(s, "no total in this scenario") for s in (roles.nf4, roles.fused)
                if s not in tot.index]
        bounded = [s for s in upper_bounds(per_token.get(sc, pd.DataFrame()))
                   if s in (roles.nf4, roles.fused, row["best_series"])]
        if bounded:  # a total with an idled window in it bounds the true figure from above
            row["bound"] = (f"{', '.join(bounded)}: an upper bound (a layer's energy window "
                            f"idled)")
        if not row["best_series"]:
            gone.append(("fused int4", "no path with a total in this scenario"))
        rows.append({"scenario": sc, "label": sc.label, **row, "missing": _missing(gone)})
    return pd.DataFrame(rows, columns=["scenario", "label", *COLUMNS])


def model_splits(model_records: list[dict]) -> pd.DataFrame:
    """One row per (workload, batch) bitsandbytes ran: the split of the J/token of the phase
    the workload is judged by."""
    from dqprof.fullmodel.headline import relative_to_bf16

    roles = Roles(MODEL_NF4, MODEL_FUSED, MODEL_INT4)
    by: dict[tuple[str, int], dict[str, float]] = {}
    phase: dict[tuple[str, int], str] = {}
    for r in relative_to_bf16(model_records):
        by.setdefault((r.workload, r.batch), {})[r.quant] = r.j_per_token
        phase[(r.workload, r.batch)] = r.phase
    rows = []
    for (workload, batch), j in by.items():
        if MODEL_NF4 not in j:
            continue
        row = split(j[MODEL_NF4], j.get(MODEL_FUSED, math.nan),
                    {q: j[q] for q in roles.int4 if q in j})
        gone = [(MODEL_FUSED, "no ok record")] if MODEL_FUSED not in j else []
        if not row["best_series"]:
            gone.append((" / ".join(MODEL_INT4), "no ok record"))
        rows.append({"workload": workload, "batch": batch, "phase": phase[(workload, batch)],
                     **row, "missing": _missing(gone)})
    return pd.DataFrame(rows, columns=["workload", "batch", "phase", *COLUMNS])


def load_model_splits(run_dir: Path) -> pd.DataFrame | None:
    """model_splits of the folder's model.jsonl (its latest record per key); None without one.
    A malformed file is a DqprofError, as everywhere."""
    from dqprof.fullmodel.records import MODEL_FILE, latest, load_model_records

    if not (Path(run_dir) / MODEL_FILE).exists():
        return None
    return model_splits(latest(load_model_records(Path(run_dir))))


@dataclass
class Coverage:
    """What a run lacks for the split, per metric: paths absent from the run, and paths in
    the run with no usable figure of that metric anywhere (why, from the records)."""
    absent: list[str] = field(default_factory=list)  # role series not in the run
    no_figure: dict[str, str] = field(default_factory=dict)  # series -> why


def coverage(points: pd.DataFrame, records: list[dict], metric: str,
             roles: Roles | None = None) -> Coverage:
    roles = roles or roles_of(points)
    present = set(points["series"])
    out = Coverage(absent=[s for s in roles.all if s not in present])
    ok = points[points["status"] == "ok"]
    for s in roles.all:
        if s not in present:
            continue
        mine = ok[ok["series"] == s]
        if mine[metric].notna().any():
            continue
        out.no_figure[s] = _no_figure_reason(points, records, s, metric)
    return out


def _no_figure_reason(points: pd.DataFrame, records: list[dict], series: str,
                      metric: str) -> str:
    mine = points[points["series"] == series]
    if not (mine["status"] == "ok").any():
        reasons = mine["reason"].dropna().unique()
        return "no ok point" + (f" ({reasons[0]})" if len(reasons) else "")
    if metric != "energy_j":
        return "no time figure"
    backend = str(mine["backend"].iloc[0])
    for r in records:
        why = (r.get("method") or {}).get("energy_skipped")
        if r.get("backend") == backend and why:
            return f"timed, not metered ({why})"
    return "timed, no energy figure in any record"


def needs(series: str) -> str:
    """What a path absent from the run would need."""
    backend = series.split("[")[0]
    return f"`dqprof bench --backends {backend}`, with {NEEDS.get(backend, 'its package')}"


@dataclass
class FormatPath:
    """The kernel-level split of one run, per metric (time_s, and energy_j where measured)."""
    roles: Roles
    points: dict[str, pd.DataFrame]  # metric -> point_splits
    tokens: dict[str, pd.DataFrame]  # metric -> token_splits
    coverage: dict[str, Coverage]  # metric -> what the run lacks

    @property
    def splittable(self) -> bool:
        """bnb-nf4 and triton-nf4 are both in the run (else there is nothing to split)."""
        absent = self.coverage[next(iter(self.coverage))].absent if self.coverage else []
        return self.roles.nf4 not in absent and self.roles.fused not in absent


def analyze(points: pd.DataFrame, records: list[dict],
            per_token: dict[str, dict[Scenario, pd.DataFrame]]) -> FormatPath:
    """``per_token``: metric -> scenario -> breakdown.per_token rows (Analysis.per_token)."""
    roles = roles_of(points)
    return FormatPath(
        roles, {m: point_splits(points, m, roles) for m in per_token},
        {m: token_splits(rows, roles) for m, rows in per_token.items()},
        {m: coverage(points, records, m, roles) for m in per_token})
