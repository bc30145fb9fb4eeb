"""Per-layer energy (or time) per token of the linears, for decode and prefill scenarios.

Decode with batch B runs every layer at M = B once per step of B tokens; prefill of a T-token
prompt runs every layer at M = T, except per-sequence layers (lm_head: logits of the last
token only), which run at M = 1 once per prompt. Per token: calls_per_token x figure(M) / tokens.
A layer a path does not run (recorded skipped: lm_head stays bf16 under vLLM's quantizations;
a shape the path cannot take) uses the bf16 record of that layer, and says so; a layer the path
has no record of (a cut or partial run) leaves the path out of the scenario. An M that was not
measured is interpolated in log-log between measured M, or the nearest measured M is used
outside the
range the layer was run at (see interp.py); each row states which. A path without a figure at
an M inside that range (failed there, or not reached) has no total for that scenario: it is
left out and listed, never filled.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from dqprof.analysis.frame import DEQUANT, reference_of, series_order
from dqprof.analysis.interp import value_at

GROUPS = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down", "ple", "lm_head")


@dataclass(frozen=True)
class Scenario:
    phase: str  # "decode" or "prefill"
    size: int  # decode: batch size; prefill: prompt tokens (one sequence)

    @property
    def label(self) -> str:
        return (f"decode, batch {self.size}" if self.phase == "decode"
                else f"prefill, {self.size} tokens")

    def m_for(self, per_sequence: bool) -> int:
        return 1 if self.phase == "prefill" and per_sequence else self.size


DECODE = (Scenario("decode", 1), Scenario("decode", 8), Scenario("decode", 64))
PREFILL = (Scenario("prefill", 512), Scenario("prefill", 2048))
SCENARIOS = DECODE + PREFILL


def _layers(points: pd.DataFrame) -> pd.DataFrame:
    return points.drop_duplicates("layer")[["layer", "group", "calls_per_token", "per_sequence"]]


def per_token(points: pd.DataFrame, scenario: Scenario, metric: str = "energy_j"
              ) -> tuple[pd.DataFrame, list[str]]:
    """Rows (series, layer): the layer's ``metric`` per token in ``scenario``; and what was
    left out (a layer whose ok records lack the figure, or that not even bf16 has)."""
    ok = points[points["status"] == "ok"]
    refs = reference_of(points)
    # a path with no ok point at all (not runnable here) is left out, not filled with bf16
    series = [s for s in series_order(ok) if not s.startswith(DEQUANT)]
    rows, left_out = [], []
    missing: dict[str, list[str]] = {}  # series -> layers without a figure
    for s in series:
        for lay in _layers(points).itertuples():
            m = scenario.m_for(lay.per_sequence)
            own = ok[(ok["series"] == s) & (ok["layer"] == lay.layer)]
            used, note = s, ""
            if own.empty:
                recs = points[(points["series"] == s) & (points["layer"] == lay.layer)]
                skipped = recs[recs["status"] == "skipped"]
                if skipped.empty:  # not measured (a cut or partial run): no stand-in
                    missing.setdefault(s, []).append(f"{lay.layer} (not in the run)")
                    continue
                # the path does not run this layer: vLLM runs it in bf16
                why = skipped["reason"].dropna().iloc[0] if skipped["reason"].notna().any() \
                    else "skipped"
                used, note = refs[s], f"{refs[s]} record used ({why})"
                own = ok[(ok["series"] == used) & (ok["layer"] == lay.layer)]
            at = value_at(own["m"], own[metric], m)
            bound = ""
            if (metric == "energy_j" and "energy_bound_j" in own
                    and (at is None or at.method != "measured")):
                # a window flagged for GPU idle at this M: its figure, as an upper bound,
                # rather than a neighbour's or the path leaving the scenario
                flagged = own[(own["m"] == m) & own["energy_bound_j"].notna()]
                if len(flagged):
                    f = flagged.iloc[0]
                    at = value_at([m], [f["energy_bound_j"]], m)
                    bound = f"{lay.layer} at M={m}: {f['energy_flag']}"
            # the M this layer was run at by any path: a neighbour stands in only outside it
            # (inside, the path failed there or the run was cut before it)
            tried = points[points["layer"] == lay.layer]["m"]
            tried = tried[tried > 0]
            if at is not None and at.method == "nearest" and tried.min() <= m <= tried.max():
                at = None
            if at is None:
                missing.setdefault(s, []).append(f"{lay.layer} at M={m}")
                continue
            rows.append({"series": s, "layer": lay.layer, "group": lay.group, "m": m,
                         "source": used, "substituted": used != s, "how": at.how,
                         "interpolated": at.method != "measured", "per_call": at.value,
                         "calls_per_token": lay.calls_per_token,
                         "per_token": lay.calls_per_token * at.value / scenario.size,
                         "note": note, "upper_bound": bound})
    cols = ["series", "layer", "group", "m", "source", "substituted", "how", "interpolated",
            "per_call", "calls_per_token", "per_token", "note", "upper_bound"]
    # a total missing a layer would look cheaper than it is: such a path leaves the scenario
    word = "energy" if metric == "energy_j" else "time"
    for s, layers in missing.items():
        named = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
        left_out.append(f"{scenario.label}: {s} left out, no {word} figure (failed or not "
                        f"measured) for {named}")
    rows = [r for r in rows if r["series"] not in missing]
    return pd.DataFrame(rows, columns=cols), left_out


def upper_bounds(rows: pd.DataFrame) -> dict[str, list[str]]:
    """Series -> the layers whose figure is an upper bound (a window flagged for GPU idle):
    that series' total bounds its true figure from above."""
    if rows.empty or "upper_bound" not in rows:
        return {}
    b = rows[rows["upper_bound"].astype(bool)]
    return {s: g["upper_bound"].tolist() for s, g in b.groupby("series", sort=False)}


def totals(rows: pd.DataFrame) -> pd.DataFrame:
    """Series x group table of per-token figures with a 'total' column."""
    if rows.empty:
        return pd.DataFrame()
    t = rows.pivot_table(index="series", columns="group", values="per_token", aggfunc="sum",
                         sort=False)
    order = [g for g in GROUPS if g in t.columns] + [g for g in t.columns if g not in GROUPS]
    t = t[order]
    t["total"] = t.sum(axis=1)
    return t
