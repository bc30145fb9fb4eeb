"""The report's full-model section, for a run folder that also holds vLLM results
(model.jsonl): J/token of each quantization relative to bf16 (dqprof.fullmodel.headline), how
much of it the linear layers' kernel records explain (dqprof.fullmodel.reconcile), and the
reconciliation figure."""

from __future__ import annotations

from matplotlib.figure import Figure

from dqprof.analysis.doc import Para, Table
from dqprof.analysis.frame import Run
from dqprof.errors import DqprofError
from dqprof.models.config import load_config
from dqprof.models.shapes import linear_shapes

Figures = dict[str, tuple[Figure, str]]


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _missing(records: list[dict]) -> list[str]:
    """Configurations another quantization measured that this one has no figures for."""
    ok = {(r["quant"], r["workload"], r["batch"]) for r in records if r.get("status") == "ok"}
    why = {(r["quant"], r["workload"], r["batch"]): r.get("reason") or r.get("status")
           for r in records if r.get("status") != "ok"}
    points = sorted({(w, b) for _, w, b in ok})
    quants = list(dict.fromkeys(r["quant"] for r in records))
    return [f"{q} {w} B={b}: {why.get((q, w, b), 'not run (no record)')}"
            for q in quants for w, b in points if (q, w, b) not in ok]


def _method(records: list[dict]) -> str:
    """How the records were measured, from the records themselves (the first ok one)."""
    r = next((r for r in records if r.get("status") == "ok" and r.get("method")), None)
    if r is None:
        return ""
    m = r["method"]
    return (f"Method: {m.get('energy')}; windows of at least {m.get('window_min_s')} s and "
            f"{m.get('window_min_ticks')} counter updates after {m.get('warmup_calls')} "
            f"warm-up call(s); {m.get('split') or r.get('split_method')}.")


def full_model_section(run: Run, prefix: str = "") -> tuple[Figures, list, list[str]]:
    """(figures, report blocks, left out): all empty when the folder has no model.jsonl."""
    from dqprof.fullmodel.headline import relative_to_bf16
    from dqprof.fullmodel.plot import plot_reconciliation
    from dqprof.fullmodel.reconcile import reconcile, stand_ins
    from dqprof.fullmodel.records import MODEL_FILE, latest, load_model_records

    if not (run.path / MODEL_FILE).exists():
        return {}, [], []
    try:
        model_records = latest(load_model_records(run.path))
        shapes = linear_shapes(load_config(run.model))
    except DqprofError as e:
        return {}, [], [f"full model: {e}"]
    rows = reconcile(model_records, run.records, shapes)
    explained = {(r.quant, r.workload, r.batch, r.phase): r for r in rows}
    table = []
    for h in relative_to_bf16(model_records):
        rec = explained.get((h.quant, h.workload, h.batch, h.phase))
        frac = rec.explained_fraction if rec else None
        tfrac = (rec.predicted_s_per_token / rec.measured_s_per_token
                 if rec and rec.predicted_s_per_token and rec.measured_s_per_token else None)
        table.append([h.quant + ("*" if rec and rec.proxies else ""), h.workload, str(h.batch),
                      h.phase, f"{h.j_per_token:.3g}", _x(h.j_vs_bf16),
                      _x(h.j_above_idle_vs_bf16), _x(h.j_per_output_token_vs_bf16),
                      _x(h.tokens_per_s_vs_bf16), "-" if frac is None else f"{frac:.0%}",
                      "-" if tfrac is None else f"{tfrac:.0%}",
                      ", ".join(h.throttle) or "-"])
    used = stand_ins(rows)
    blocks: list = [Table(
        ["quantization", "workload", "B", "phase", "J/token", "vs bf16", "above idle vs bf16",
         "J/output token vs bf16", "tokens/s vs bf16", "linears explain",
         "linears' time share", "throttle"], table,
        "vLLM runs of the whole model (model.jsonl). J/token of the phase the workload is "
        "made of (decode tokens of the decode-heavy calls, prompt tokens of the prefill-heavy "
        "ones), idle included; 'J/output token' is the whole call's energy over its output "
        "tokens; 'linears explain': the linear layers' J/token predicted from this run's "
        "kernel records over the measured J/token; 'linears' time share': their predicted "
        "time per token over the measured one."
        + (f" * the kernel records lack figures of the kernel vLLM ran: {', '.join(used)} "
           "stood in."
           if used else ""))]
    if method := _method(model_records):
        blocks.append(Para(method))
    if gaps := _missing(model_records):
        blocks.append(Para("No figures for: " + "; ".join(gaps) + "."))
    decode = [r for r in rows if r.phase == "decode" and r.explained_fraction is not None]
    if not decode:
        return {}, blocks, ["reconciliation: no ok full-model record with a kernel prediction"]
    wl = decode[0].workload
    fig = plot_reconciliation(model_records, run.records, shapes, workload=wl)
    shares = "; ".join(f"{r.quant} B={r.batch}: {r.explained_fraction:.0%}"
                       for r in decode if r.workload == wl)
    caption = (f"Full model ({wl}): each linear group's J/token predicted from this run's "
               f"kernel records, as a share of vLLM's measured J/token (stacked); hatched: "
               f"the remainder (attention, norms, embeddings/PLE gathers, sampling, idle). "
               f"Decode explained: {shares}.")
    figures = {prefix + "reconciliation": (fig, caption)}
    blocks += _in_situ(rows)
    from dqprof.fullmodel.plot import plot_decode_steps

    if (steps := plot_decode_steps(model_records, workload=wl)) is not None:
        figures[prefix + "decode_step"] = (steps, (
            f"Full model ({wl}): one decode step measured in situ (torch.profiler over a few "
            f"engine steps, outside the energy windows), device time by part: the linear "
            f"layers by group, attention, everything else, and device idle between kernels."))
    return figures, blocks, []


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e6:.3g}"


def _in_situ(rows: list) -> list:
    """The table of profiled steps: linears predicted vs measured in situ, the rest."""
    table = []
    for r in rows:
        v = r.in_situ
        if not v:
            continue
        if v.get("status") != "ok":
            table.append([r.quant, r.workload, str(r.batch), r.phase, "-", "-", "-", "-", "-",
                          "-", f"failed: {v.get('reason')}"])
            continue
        rest = v["rest_s_per_token"]
        ratio = v.get("predicted_over_in_situ")
        table.append([r.quant, r.workload, str(r.batch), r.phase,
                      _us(r.predicted_s_per_token), _us(v["linear_s_per_token"]),
                      "-" if ratio is None else f"{ratio:.2f}", _us(rest.get("attention")),
                      _us(sum(x for c, x in rest.items() if c != "attention")),
                      _us(v["idle_s_per_token"]),
                      "-" if v.get("named_fraction") is None else f"{v['named_fraction']:.0%}"])
    if not table:
        return []
    return [Table(["quantization", "workload", "B", "phase", "linears predicted us/token",
                   "linears in situ us/token", "predicted / in situ", "attention us/token",
                   "other us/token", "idle us/token", "named + idle"], table,
                  "The profiled steps (model.jsonl in_situ): device time per token of the "
                  "linear layers predicted from the kernel records and measured in situ, and "
                  "the rest of the step by category; 'named + idle': the share of the step's "
                  "span that named categories and device idle account for. Energy per part "
                  "in the records is an estimate (the window's J/token split by time share).")]
