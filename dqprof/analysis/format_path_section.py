"""The report's "format or path" section: tables, notes and generated sentences built from
format_path's splits (every figure computed from the records), and the full-model split when
the run folder holds model.jsonl."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import pandas as pd

from dqprof.analysis import fmt
from dqprof.analysis import format_path as fp
from dqprof.analysis.breakdown import DECODE, PREFILL, Scenario
from dqprof.analysis.compute import Analysis
from dqprof.analysis.doc import Heading, Items, Para, Plot, Table
from dqprof.analysis.interp import nearest_m
from dqprof.errors import DqprofError

UNIT = {"energy_j": fmt.mj, "time_s": fmt.us}
WORD = {"energy_j": "energy", "time_s": "time"}
MODEL_HEADING = "Full model in vLLM (J/token)"
LAYER_MS = tuple(sc.size for sc in (*DECODE, PREFILL[-1]))  # the per-token scenarios' M
METHOD = (
    "gap = bnb-nf4 − best, path = bnb-nf4 − triton-nf4 (the same NF4 bytes: bitsandbytes' "
    "kernels against one fused kernel), format = triton-nf4 − best (NF4 through a fused "
    "kernel against stored int4); path + format = gap, shares are of the gap. best: the "
    "cheapest of {int4} with a usable figure (energy flagged doubtful is dropped, as "
    "everywhere in this report); per layer the cheapest at that (layer, M), per token the one "
    "path with the lowest all-linears total. The format part is measured with triton-nf4, so "
    "it is an upper bound on what the format itself costs: a faster NF4 kernel moves cost from "
    "format to path. A negative path (triton-nf4 slower than bitsandbytes) is shown as it is, "
    "not clipped.")
READING = {"split": "",
           "path negative": "path < 0: format part is an upper bound",
           "format free": "format ≤ 0: the format costs nothing",
           "no gap": "gap ≤ 0: nothing to split"}
READING_KEY = ("reading: 'path < 0': {fused} is slower than {nf4}, so the format part "
               "exceeds the gap and is an upper bound set by {fused}; 'format ≤ 0': {fused} "
               "is at or below the best int4 path; 'gap ≤ 0': {nf4} is at or below it.")


def where(sc: Scenario) -> str:
    return (f"decode (batch {sc.size})" if sc.phase == "decode"
            else f"prefill ({sc.size} tokens)")


def sentence(row: Mapping, at: str, unit: Callable[[float], str], what: str,
             nf4: str = fp.NF4, fused: str = fp.FUSED_NF4) -> str | None:
    """One split as a sentence; None where a part is missing. ``at``: 'At decode (batch 1)';
    ``what``: the figure, e.g. 'of energy per token'."""
    kind = row["reading"]
    if not kind:
        return None
    text = _sentence(row, kind, at, unit, what, nf4, fused)
    bound = row.get("bound") or ""
    return f"{text[:-1]} ({bound})." if bound else text


def _sentence(row: Mapping, kind: str, at: str, unit: Callable[[float], str], what: str,
              nf4: str, fused: str) -> str:
    best = row["best_series"]
    gap, path, form = row["gap"], row["path"], row["format"]
    p_share, f_share = fmt.pct(row["path_share"]), fmt.pct(row["format_share"])
    if kind == "no gap":
        return (f"{at}, {nf4} ({unit(row['nf4'])} {what}) costs no more than {best} "
                f"({unit(row['best'])}), the best fused int4 path: there is no excess to "
                f"split; {fused} costs {unit(row['fused'])}.")
    head = (f"{at}, {nf4} exceeds {best} (the best fused int4 path) by {unit(gap)} {what}")
    if kind == "path negative":
        return (f"{head}; {fused} costs {unit(-path)} more than {nf4} itself, so the path part "
                f"is negative ({unit(path)}) and the format part, {unit(form)} ({f_share} of "
                f"the gap), is an upper bound set by this kernel, not the format's own cost.")
    if kind == "format free":
        return (f"{head}; {fused} is {unit(-form)} below {best}, so the format costs nothing "
                f"there: the path ({nf4} − {fused}) is {unit(path)}, {p_share} of the gap.")
    return (f"{head}: the path ({nf4} − {fused}) costs {unit(path)} of it ({p_share}), the "
            f"format ({fused} − {best}) {unit(form)} ({f_share}).")


def token_sentence(f: fp.FormatPath, metric: str, sc: Scenario) -> str | None:
    t = f.tokens.get(metric)
    if t is None:
        return None
    rows = t[t["label"] == sc.label]
    if rows.empty:
        return None
    return sentence(rows.iloc[0], f"At {where(sc)}", UNIT[metric],
                    f"of {WORD[metric]} per token over all linears", f.roles.nf4, f.roles.fused)


def _part(v: float, share: float, unit: Callable[[float], str]) -> str:
    if not math.isfinite(v):
        return fmt.DASH
    return unit(v) + (f" ({fmt.pct(share)})" if math.isfinite(share) else "")


def _reading(r) -> str:
    if r.missing:
        return "missing: " + r.missing
    return "; ".join(t for t in (READING.get(r.reading, ""), getattr(r, "bound", "")) if t)


def _cells(r, unit: Callable[[float], str]) -> list[str]:
    best = f"{r.best_series}: {unit(r.best)}" if r.best_series else fmt.DASH
    return [unit(r.nf4), unit(r.fused), best, unit(r.gap),
            _part(r.path, r.path_share, unit), _part(r.format, r.format_share, unit),
            _reading(r)]


def _headers(nf4: str, fused: str) -> list[str]:
    return [nf4, fused, "best fused int4", f"gap: {nf4} − best",
            f"path: {nf4} − {fused}", f"format: {fused} − best", "reading"]


def token_table(f: fp.FormatPath, metric: str) -> Table:
    nf4, fused, unit = f.roles.nf4, f.roles.fused, UNIT[metric]
    rows = [[r.label] + _cells(r, unit) for r in f.tokens[metric].itertuples()]
    return Table(["scenario"] + _headers(nf4, fused), rows,
                 f"All linears, {WORD[metric]} per token (the per-token figures above); in "
                 f"brackets: share of the gap. " + READING_KEY.format(nf4=nf4, fused=fused))


def layer_table(f: fp.FormatPath, metric: str) -> Table:
    nf4, fused, unit = f.roles.nf4, f.roles.fused, UNIT[metric]
    p = f.points[metric]
    used = [u for _, u in nearest_m(p["m"], LAYER_MS)]
    rows = [[r.layer, str(r.m)] + _cells(r, unit)
            for m in used for r in p[p["m"] == m].itertuples()]
    return Table(["layer", "M"] + _headers(nf4, fused), rows,
                 f"{WORD[metric].capitalize()} per call at the measured M nearest to each "
                 f"per-token scenario's; best per (layer, M). Every measured M: "
                 f"format_path.csv. " + READING_KEY.format(nf4=nf4, fused=fused))


def coverage_notes(f: fp.FormatPath) -> list[str]:
    notes = []
    absent = f.coverage[next(iter(f.coverage))].absent if f.coverage else []
    for s in absent:
        notes.append(f"{s}: not in this run (needs {fp.needs(s)})")
    for metric, c in f.coverage.items():
        for s, why in c.no_figure.items():
            role = (f"the {WORD[metric]} split's best is over the other int4 paths"
                    if s in f.roles.int4 else f"no {WORD[metric]} split")
            notes.append(f"{s}: {why}: {role}")
    return notes


def section(a: Analysis, plots: Mapping[str, Plot], prefix: str = "", level: int = 2) -> list:
    """The section's blocks: findings, per-token and per-layer tables, figure, full model."""
    f = a.format_path
    if f is None:
        return []
    h = level
    out: list = [Heading(h, "Format or path: what bnb-nf4's excess over fused int4 is made "
                            "of")]
    int4 = ", ".join(f.roles.int4)
    out.append(Para(METHOD.format(int4=int4)))
    if f.roles.fused == fp.FUSED_NF4:  # the default kernel: nested statistics
        out.append(Para(
            "The statistics bytes differ: bnb-nf4 as vLLM runs it reads fp32 absmax (vLLM "
            "undoes the nested statistics at load: 4 bytes per 64 weights; records made before "
            "2026-12-01 ran the nested form and dequantized it in every call), triton-nf4 the "
            "nested form (1 byte per 64 weights and an fp32 per 256 blocks). A run that also "
            "holds `triton-nf4[stats=fp32]` splits on the same bytes."))
    else:
        out.append(Para(f"The fused NF4 kernel here is {f.roles.fused}: the fp32 absmax "
                        "bnb-nf4 reads, so the path part compares the same bytes."))
    notes = coverage_notes(f)
    if not f.splittable:
        missing = [s for s in (f.roles.nf4, f.roles.fused) if s in
                   f.coverage[next(iter(f.coverage))].absent]
        out.append(Para("No split: this run lacks " + " and ".join(missing) + "."))
        out.append(Items(notes))
        return out + model_blocks(a, h)
    said = [s for metric in reversed(a.metrics)
            for sc in (DECODE[0], DECODE[-1], PREFILL[-1])
            if (s := token_sentence(f, metric, sc))]
    if said:
        out.append(Items(said, ordered=True))
    for metric in reversed(a.metrics):
        out += [Heading(h + 1, f"{WORD[metric].capitalize()} per token"),
                token_table(f, metric)]
    for metric in reversed(a.metrics):
        out += [Heading(h + 1, f"{WORD[metric].capitalize()} per call, per layer"),
                layer_table(f, metric)]
    if prefix + "format_path" in plots:
        out.append(plots[prefix + "format_path"])
    if notes:
        out.append(Items(notes))
    return out + model_blocks(a, h)


def model_blocks(a: Analysis, level: int) -> list:
    """The full-model split from the run folder's model.jsonl; [] where it has none."""
    try:
        splits = fp.load_model_splits(a.run.path)
    except DqprofError as e:
        return [Heading(level + 1, MODEL_HEADING), Para(f"No split: {e}")]
    if splits is None:
        return []
    out: list = [Heading(level + 1, MODEL_HEADING)]
    if splits.empty:
        return out + [Para(f"No split: model.jsonl holds no ok {fp.MODEL_NF4} record "
                           f"(needs {fp.MODEL_NEEDS[fp.MODEL_NF4]}).")]
    return out + model_text(splits)


def _poss(name: str) -> str:
    return name + ("'" if name.endswith("s") else "'s")


def path_sentence(row: Mapping, at: str, what: str, nf4: str, fused: str) -> str | None:
    """The path part alone, where no fused int4 run gives the gap (None without both NF4s)."""
    a, b = row["nf4"], row["fused"]
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0:
        return None
    if b > a:
        return (f"{at}, {fused} costs {fmt.mj(b)} {what} against {_poss(nf4)} {fmt.mj(a)}: "
                f"this kernel is slower than {_poss(nf4)} path there, so it cannot tell the "
                f"path from the format.")
    return (f"{at}, {nf4} costs {fmt.mj(a)} {what} and {fused}, on the same NF4 bytes, "
            f"{fmt.mj(b)}: {_poss(nf4)} path is {fmt.mj(a - b)}, {fmt.pct((a - b) / a)} of "
            f"its figure (no fused int4 run in this file to split the rest).")


def model_text(splits: pd.DataFrame) -> list:
    """Sentences, table and what is missing for the full-model split."""
    nf4, fused = fp.MODEL_NF4, fp.MODEL_FUSED
    out: list = []
    said = []
    for wl, g in splits.groupby("workload", sort=False):
        for r in (g.iloc[0], g.iloc[-1]) if len(g) > 1 else (g.iloc[0],):
            at = f"In vLLM, {wl} workload at batch {r['batch']}"
            text = sentence(r, at, fmt.mj, f"per {r['phase']} token", nf4, fused) \
                or path_sentence(r, at, f"per {r['phase']} token", nf4, fused)
            if text:
                said.append(text)
    if said:
        out.append(Items(said))
    rows = [[r.workload, str(r.batch), r.phase] + _cells(r, fmt.mj)
            for r in splits.itertuples()]
    out.append(Table(["workload", "B", "phase"] + _headers(nf4, fused), rows,
                     f"J per token of the phase each workload is judged by, idle included "
                     f"(model.jsonl); best: the better of {', '.join(fp.MODEL_INT4)}. "
                     + READING_KEY.format(nf4=nf4, fused=fused)))
    if splits["fused"].isna().all():
        out.append(Para(f"No path/format split in the full model: model.jsonl has no ok "
                        f"{fused} record (needs {fp.MODEL_NEEDS[fused]}); the table gives the "
                        f"gap only."))
    if not splits["best_series"].astype(bool).any():
        out.append(Para("No gap in the full model: model.jsonl has no ok record of "
                        + " or ".join(fp.MODEL_INT4) + " (needs "
                        + "; ".join(fp.MODEL_NEEDS[q] for q in fp.MODEL_INT4) + ")."))
    return out
