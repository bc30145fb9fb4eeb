"""Predict the linear layers' energy per token from a kernel profile; compare with vLLM runs.

Decode at batch B: every linear shape runs at M = B, ``calls_per_token`` times per step, and
a step makes B tokens: J/token = sum(E(shape, M=B) * calls_per_token) / B (lm_head included:
it runs every decode step). Prefill of B prompts of L tokens: vLLM runs chunks of up to
``max_num_batched_tokens`` tokens (recorded by the runner), so M = min(B*L, chunk) and
J/token = sum(E(M) * calls_per_token) / M over the per-token shapes, plus lm_head, which runs
once per sequence (on its last prompt token): E(lm_head, M=B) / (B*L), as one call at M=B
(vLLM spreads it over the steps in which sequences finish their prefill).

Backends: each quantization's quantized layers use its kernel backend (QUANT_BACKEND), or the
one vLLM reported picking (``engine.linear_kernel``: on Hopper, GPTQ and AWQ checkpoints run
through Machete, not Marlin: KERNEL_BACKEND);
when the profile has no records of that kernel (measured before the Machete paths existed),
the same checkpoint format's other fused kernel stands in (PROXY_BACKEND: Marlin for
Machete), and every term and row says so (``proxy_for``, ``proxies``); when it has the
kernel's time but no energy (the H200 profile's Machete records: its energy window stalls the
GPU, see profiles/h200/README.md), time is the kernel's own and only energy comes from the
stand-in (``energy_from``; ``proxies`` names it "<stand-in> energy");
layers vLLM keeps bf16 under every scheme (``LinearShape.quantized`` False: the tied lm_head)
use the bf16 records. When the profile lacks the exact M, energy and time are interpolated
linearly in log(M)-log(value) between the nearest measured M below and above ("log-interp"),
taken from the smallest measured M below the measured range ("nearest": small GEMMs cost about
the same per call), or scaled in proportion to M from the largest one above it
("linear-extrap": large GEMMs are compute-bound); each term says which. Records are matched
on layer name, N and K, so a profile of the full model predicts a cut (``--layers``) model
too: calls per token come from the model's own shapes.

What the linear layers do not explain is the remainder: attention, norms and activations,
embedding and PLE gathers, sampling, host/scheduler gaps and, on the total basis, the idle
power drawn through all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dqprof.analysis.interp import value_at
from dqprof.fullmodel.plugin import BACKEND as PLUGIN_BACKEND
from dqprof.models.shapes import LinearShape

QUANT_BACKEND = {"bf16": "bf16", "bitsandbytes": "bnb-nf4", "gptq_marlin": "marlin-gptq",
                 "awq_marlin": "marlin-awq", "dqprof_nf4": PLUGIN_BACKEND,
                 # vLLM's fp8 on sm_90: CUTLASS scaled_mm, per-tensor weights, per-token
                 # dynamic activations (the sweep's fp8 path)
                 "fp8": "fp8"}
# (quantization, the linear kernel vLLM logged) -> the kernel profile's path
KERNEL_BACKEND = {("gptq_marlin", "Machete"): "machete-gptq",
                  ("awq_marlin", "Machete"): "machete-awq"}
# the kernel vLLM ran -> the profile's stand-in for it: same int4 format, group size and
# weight bytes; the time and energy differ (the reason for preferring the real kernel)
PROXY_BACKEND = {"machete-gptq": "marlin-gptq", "machete-awq": "marlin-awq"}
UNQUANTIZED_BACKEND = "bf16"
REMAINDER = ("attention", "norms and activations", "embedding and PLE gathers", "sampling",
             "host and scheduler gaps")
IDLE_PART = "idle power during all of it"
ENERGY_SPLIT = ("estimate: the phase's measured J/token split by each part's share of the "
                "profiled step's device time (idle included); no per-kernel energy")


@dataclass(frozen=True)
class Term:
    layer: str
    group: str
    backend: str
    m: int
    calls: float  # kernel calls per token of this phase (calls_per_token / tokens per call)
    method: str  # exact, log-interp, nearest, linear-extrap, missing
    m_used: tuple[int, ...]
    j_per_call: float | None
    s_per_call: float | None
    j_per_token: float | None
    s_per_token: float | None
    proxy_for: str = ""  # the kernel vLLM ran, when ``backend`` stands in for it
    energy_from: str = ""  # the stand-in whose energy was used: ``backend`` has time only


@dataclass
class Prediction:
    quant: str
    phase: str  # decode or prefill
    batch: int
    m: int
    terms: list[Term]

    @property
    def j_per_token(self) -> float | None:
        vals = [t.j_per_token for t in self.terms]
        return sum(vals) if vals and None not in vals else None  # type: ignore[arg-type]

    @property
    def s_per_token(self) -> float | None:
        vals = [t.s_per_token for t in self.terms]
        return sum(vals) if vals and None not in vals else None  # type: ignore[arg-type]

    @property
    def missing(self) -> list[str]:
        return [t.layer for t in self.terms if t.method == "missing"]

    @property
    def proxies(self) -> dict[str, str]:
        """{kernel vLLM ran: profile backend that stood in for it (or for its energy)}"""
        out = {t.proxy_for: t.backend for t in self.terms if t.proxy_for}
        out.update({t.backend: f"{t.energy_from} energy" for t in self.terms if t.energy_from})
        return out

    def by_group(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.terms:
            out[t.group] = out.get(t.group, 0.0) + (t.j_per_token or 0.0)
        return out


def backend_for(quant: str, shape: LinearShape, linear_kernel: str | None = None) -> str:
    if quant not in QUANT_BACKEND:
        from dqprof.errors import DqprofError

        raise DqprofError(f"no kernel backend for quantization '{quant}' "
                          f"(known: {', '.join(QUANT_BACKEND)})")
    if not shape.quantized:
        return UNQUANTIZED_BACKEND
    return KERNEL_BACKEND.get((quant, linear_kernel or ""), QUANT_BACKEND[quant])


def _energy(rec: dict[str, Any], above_idle: bool) -> float | None:
    e = rec.get("energy") or {}
    return e.get("j_per_call_above_idle" if above_idle else "j_per_call")


def _time(rec: dict[str, Any]) -> float | None:
    return (rec.get("time") or {}).get("median_s")


_METHOD = {"measured": "exact", "log-interpolated": "log-interp", "nearest": "nearest"}


def _interp(points: dict[int, float], m: int) -> tuple[float | None, str, tuple[int, ...]]:
    """The figure at M, by the report's own rule (dqprof.analysis.interp.value_at)."""
    if set(points) == {0}:  # a backend whose work does not depend on M records m=0
        return points[0], "m-independent", (0,)
    at = value_at(list(points), list(points.values()), m)
    if at is None:
        return None, "missing", ()
    if at.method == "nearest" and m > at.m_used[0]:
        # past the largest measured M a GEMM is compute-bound: its per-call time and energy
        # grow with M (holding the per-call figure flat made vLLM's 16384-token prefill
        # chunks look 4x cheaper than the M=4096 measurement they came from)
        return at.value * m / at.m_used[0], "linear-extrap", at.m_used
    return at.value, _METHOD[at.method], at.m_used


def kernel_figures(records: list[dict[str, Any]], shape: LinearShape, backend: str, m: int,
                   above_idle: bool = False, variant: str = ""
                   ) -> tuple[float | None, float | None, str, tuple[int, ...]]:
    """(J per call, s per call, method, M values used) of one shape on one backend at M;
    ``backend`` may carry its variant as the sweep names it: ``triton-nf4[stats=fp32]``."""
    if backend.endswith("]") and "[" in backend and not variant:
        backend, variant = backend[:-1].split("[", 1)
    mine = [r for r in records if r.get("status") == "ok" and r.get("layer") == shape.name
            and r.get("backend") == backend and r.get("variant", "") == variant
            and r.get("n") == shape.n and r.get("k") == shape.k]
    energy = {r["m"]: v for r in mine if (v := _energy(r, above_idle)) is not None}
    times = {r["m"]: v for r in mine if (v := _time(r)) is not None}
    e, method, used = _interp(energy, m)
    t, tmethod, _ = _interp(times, m)
    if e is None and t is not None:
        method, used = tmethod, ()
    return e, t, method, used


def predict(records: list[dict[str, Any]], shapes: list[LinearShape], quant: str, phase: str,
            batch: int, prompt_len: int | None = None, chunk: int | None = None,
            above_idle: bool = False, linear_kernel: str | None = None) -> Prediction:
    """Energy and time of the linear layers per token of ``phase`` at ``batch``."""
    if phase == "decode":
        m = batch
    elif phase == "prefill":
        if not prompt_len:
            raise ValueError("prefill prediction needs the prompt length")
        m = min(batch * prompt_len, chunk) if chunk else batch * prompt_len
    else:
        raise ValueError(f"phase is decode or prefill, not {phase}")
    terms = []
    for s in shapes:
        backend = backend_for(quant, s, linear_kernel)
        if phase == "prefill" and s.per_sequence:  # one call at M=B per B*L prompt tokens
            m_s, calls = batch, s.calls_per_token / (batch * prompt_len)
        else:  # one call per step of m tokens
            m_s, calls = m, s.calls_per_token / m
        e, t, method, used = kernel_figures(records, s, backend, m_s, above_idle)
        proxy_for = energy_from = ""
        if method == "missing" and backend in PROXY_BACKEND:
            proxy_for, backend = backend, PROXY_BACKEND[backend]
            e, t, method, used = kernel_figures(records, s, backend, m_s, above_idle)
        elif e is None and t is not None and backend in PROXY_BACKEND:
            e, _, method, used = kernel_figures(records, s, PROXY_BACKEND[backend], m_s,
                                                above_idle)
            energy_from = PROXY_BACKEND[backend] if e is not None else ""
        jpt = e * calls if e is not None else None
        spt = t * calls if t is not None else None
        terms.append(Term(s.name, s.group, backend, m_s, calls, method, used, e, t, jpt, spt,
                          proxy_for, energy_from))
    return Prediction(quant, phase, batch, m, terms)


@dataclass
class Reconciled:
    quant: str
    workload: str
    batch: int
    phase: str
    m: int
    measured_j_per_token: float | None
    predicted_j_per_token: float | None  # linear layers only
    explained_fraction: float | None
    remainder_j_per_token: float | None
    measured_s_per_token: float | None
    predicted_s_per_token: float | None
    idle_in_remainder_j_per_token: float | None  # idle power x unexplained time (total basis)
    remainder_parts: list[str]
    basis: str  # total or above_idle
    methods: dict[str, int] = field(default_factory=dict)  # how many terms used each method
    missing: list[str] = field(default_factory=list)
    by_group: dict[str, float] = field(default_factory=dict)
    proxies: dict[str, str] = field(default_factory=dict)  # kernel vLLM ran: stand-in
    in_situ: dict[str, Any] | None = None  # in_situ_view of the profiled steps, or None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def in_situ_view(profile: dict[str, Any] | None, measured_j_per_token: float | None,
                 predicted_s_per_token: float | None) -> dict[str, Any] | None:
    """The profiled step per token: linears (measured, and predicted / measured), the rest
    by category, idle and host time; energy per part as an estimate (ENERGY_SPLIT)."""
    if not profile:
        return None
    if profile.get("status") != "ok":
        return {"status": profile.get("status", "failed"), "reason": profile.get("reason")}
    tokens = profile.get("tokens_per_step")
    span = profile.get("span_s")
    if not tokens or not span:
        return {"status": "failed", "reason": "profile lacks tokens per step or its span"}

    def per_token(v: float | None) -> float | None:
        return v / tokens if v is not None else None

    groups = {g: v / tokens for g, v in (profile.get("linear_by_group") or {}).items()}
    rest = {c: v / tokens for c, v in (profile.get("categories") or {}).items()}
    idle = per_token(profile.get("idle_s")) or 0.0
    linear = sum(groups.values())
    parts = {**{f"linear {g}": v for g, v in groups.items()}, **rest, "idle": idle}
    span_pt = span / tokens
    energy = ({k: measured_j_per_token * v / span_pt for k, v in parts.items()}
              if measured_j_per_token is not None else {})
    return {"status": "ok", "linear_s_per_token": linear,
            "linear_by_group_s_per_token": groups, "rest_s_per_token": rest,
            "idle_s_per_token": idle, "span_s_per_token": span_pt,
            "host_s_per_token": per_token(profile.get("host_s")),
            "predicted_over_in_situ": (predicted_s_per_token / linear
                                       if predicted_s_per_token and linear else None),
            "named_fraction": profile.get("named_fraction"),
            "assignment": profile.get("assignment"), "cut": profile.get("cut"),
            "energy_j_per_token": energy, "energy_method": ENERGY_SPLIT}


def stand_ins(rows: list[Reconciled]) -> list[str]:
    """'<profile backend> for <kernel vLLM ran>' for every stand-in the rows used."""
    return sorted({f"{b} for {k}" for r in rows for k, b in r.proxies.items()})


def reconcile(model_records: list[dict[str, Any]], kernel_records: list[dict[str, Any]],
              shapes: list[LinearShape], above_idle: bool = False) -> list[Reconciled]:
    """Measured vs predicted J/token for every ok model record, decode and prefill."""
    key = "j_per_token_above_idle" if above_idle else "j_per_token"
    out = []
    for r in model_records:
        if r.get("status") != "ok" or r.get("quant") not in QUANT_BACKEND:
            continue
        engine = r.get("engine") or {}
        chunk = engine.get("max_num_batched_tokens")
        idle = r.get("idle_power_w")
        for phase in ("decode", "prefill"):
            meas = r.get(phase) or {}
            if meas.get("flag"):  # e.g. decode of a prefill-heavy call: mostly noise
                continue
            p = predict(kernel_records, shapes, r["quant"], phase, r["batch"],
                        r.get("input_len"), chunk, above_idle, engine.get("linear_kernel"))
            mj, pj = meas.get(key), p.j_per_token
            ms, ps = meas.get("s_per_token"), p.s_per_token
            idle_part = None
            if not above_idle and idle is not None and ms is not None and ps is not None:
                idle_part = idle * max(0.0, ms - ps)
            methods: dict[str, int] = {}
            for t in p.terms:
                methods[t.method] = methods.get(t.method, 0) + 1
            prof = (r.get("in_situ") or {}).get(phase)
            out.append(Reconciled(
                r["quant"], r["workload"], r["batch"], phase, p.m, mj, pj,
                pj / mj if mj and pj is not None else None,
                mj - pj if mj is not None and pj is not None else None, ms, ps, idle_part,
                list(REMAINDER) + ([] if above_idle else [IDLE_PART]),
                "above_idle" if above_idle else "total", methods, p.missing, p.by_group(),
                p.proxies, in_situ_view(prof, mj, ps)))
    return out
