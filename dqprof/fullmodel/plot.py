"""The reconciliation figure: predicted linear-layer J/token, by group, against measured.

One panel per phase (decode, prefill); one bar per (quantization, batch) of one workload:
each linear group's predicted energy as a share of the measured J/token, stacked, with the
hatched remainder up to 100 % and the measured J/token written above the bar. Shares, not
joules: decode J/token falls ~50x from batch 1 to 128, which would flatten the large batches.
A bar marked * used a stand-in kernel's figures (Marlin's, where Machete's are missing).
Pure matplotlib (Agg).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dqprof.fullmodel.insitu import UNASSIGNED
from dqprof.fullmodel.reconcile import QUANT_BACKEND, reconcile, stand_ins
from dqprof.models.shapes import LinearShape

GROUP_ORDER = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down", "ple", "lm_head")
SHORT = {"bitsandbytes": "bnb", "gptq_marlin": "gptq", "awq_marlin": "awq",
         "dqprof_nf4": "dq-nf4"}  # tick labels


def plot_reconciliation(model_records: list[dict[str, Any]],
                        kernel_records: list[dict[str, Any]], shapes: list[LinearShape],
                        workload: str | None = None, above_idle: bool = False,
                        path: Path | None = None):
    """Draw (and save to ``path`` if given) the figure; returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    rows = reconcile(model_records, kernel_records, shapes, above_idle)
    if workload is None and rows:
        workload = rows[0].workload
    rows = [r for r in rows if r.workload == workload]
    quants = [q for q in QUANT_BACKEND if any(r.quant == q for r in rows)]
    groups = [g for g in GROUP_ORDER if any(g in r.by_group for r in rows)]
    groups += sorted({g for r in rows for g in r.by_group} - set(groups))
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), squeeze=False)
    for ax, phase in zip(axes[0], ("decode", "prefill"), strict=True):
        mine = [r for r in rows if r.phase == phase]
        mine.sort(key=lambda r: (quants.index(r.quant), r.batch))
        labels = []
        for x, r in enumerate(mine):
            meas = r.measured_j_per_token
            if not meas:
                labels.append(f"{SHORT.get(r.quant, r.quant)}\nB={r.batch}\n(none)")
                continue
            bottom = 0.0
            for gi, g in enumerate(groups):
                v = r.by_group.get(g, 0.0) / meas
                ax.bar(x, v, bottom=bottom, color=colors(gi), label=g if x == 0 else None)
                bottom += v
            ax.bar(x, max(0.0, 1.0 - bottom), bottom=bottom, color="none", edgecolor="grey",
                   hatch="//", label="remainder" if x == 0 else None)
            ax.annotate(f"{meas:.3g} J", (x, max(1.0, bottom)), ha="center", va="bottom",
                        fontsize=6, xytext=(0, 2), textcoords="offset points")
            labels.append(f"{SHORT.get(r.quant, r.quant)}{'*' if r.proxies else ''}\nB={r.batch}")
        ax.axhline(1.0, color="black", lw=1)
        ax.set_xticks(range(len(mine)), labels, fontsize=7)
        basis = "above idle" if above_idle else "total"
        ax.set_ylabel(f"share of measured J per {phase} token ({basis})")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_title(f"{phase}: linear layers predicted from kernels / measured")
    if used := stand_ins(rows):
        fig.text(0.01, 0.01, "* stand-ins for figures the profile lacks of the kernel vLLM "
                 "ran: " + ", ".join(used), fontsize=7)
    handles, names = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, names = axes[0][1].get_legend_handles_labels()
    fig.suptitle(f"workload {workload}")
    fig.tight_layout(rect=(0, 0.03, 0.9, 1))
    if handles:
        fig.legend(handles[::-1], names[::-1], fontsize=8, loc="center right")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def step_parts(profile: dict[str, Any]) -> dict[str, float]:
    """A profiled step's seconds as the figure stacks them: linear groups, attention,
    other (every other category), idle."""
    parts = {g if g == UNASSIGNED else f"linear {g}": v  # UNASSIGNED names itself
             for g, v in (profile.get("linear_by_group") or {}).items()}
    cats = profile.get("categories") or {}
    parts["attention"] = cats.get("attention", 0.0)
    parts["other"] = sum(v for c, v in cats.items() if c != "attention")
    parts["idle"] = profile.get("idle_s") or 0.0
    return parts


def plot_decode_steps(model_records: list[dict[str, Any]], workload: str | None = None,
                      path: Path | None = None):
    """The profiled decode step per (quantization, batch), stacked in ms: linears by group,
    attention, other, idle; the bar's label names its batch. Returns the Figure (None when
    no record holds an ok decode profile)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in model_records if r.get("status") == "ok"
            and ((r.get("in_situ") or {}).get("decode") or {}).get("status") == "ok"]
    if workload is None and rows:
        workload = rows[0]["workload"]
    rows = [r for r in rows if r["workload"] == workload]
    if not rows:
        return None
    order = list(QUANT_BACKEND)
    rows.sort(key=lambda r: (order.index(r["quant"]) if r["quant"] in order else len(order),
                             r["batch"]))
    parts = [step_parts(r["in_situ"]["decode"]) for r in rows]
    groups = [f"linear {g}" for g in GROUP_ORDER]
    names = [n for n in groups if any(n in p for p in parts)]
    names += sorted({n for p in parts for n in p if n.startswith("linear")} - set(names))
    names += ["attention", "other", "idle"]
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 4.8))
    for x, p in enumerate(parts):
        bottom = 0.0
        for i, n in enumerate(names):
            v = p.get(n, 0.0) * 1e3
            style = ({"color": "none", "edgecolor": "grey", "hatch": "//"} if n == "idle"
                     else {"color": "lightgrey" if n == "other" else colors(i % 10)})
            ax.bar(x, v, bottom=bottom, label=n if x == 0 else None, **style)
            bottom += v
    ax.set_xticks(range(len(rows)), [f"{SHORT.get(r['quant'], r['quant'])}\nB={r['batch']}"
                                     for r in rows], fontsize=7)
    ax.set_ylabel("device time per decode step (ms)")
    ax.set_title(f"decode step in situ, {workload}: kernels by part (torch.profiler)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
