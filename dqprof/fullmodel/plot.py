"""The reconciliation figure: predicted linear-layer J/token, by group, against measured.

One panel per phase (decode, prefill); one bar per (quantization, batch) of one workload:
stacked predicted energy of each linear group, a hatched remainder up to the measured J/token,
and the measured value as a black tick. Pure matplotlib (Agg); the report hooks it in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dqprof.fullmodel.reconcile import QUANT_BACKEND, reconcile
from dqprof.models.shapes import LinearShape

GROUP_ORDER = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down", "ple", "lm_head")


def plot_reconciliation(model_records: list[dict[str, Any]],
                        kernel_records: list[dict[str, Any]], shapes: list[LinearShape],
                        workload: str | None = None, above_idle: bool = False,
                        path: Path | None = None):
    """Draw (and save to ``path`` if given) the figure; returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = reconcile(model_records, kernel_records, shapes, above_idle)
    if workload is None and rows:
        workload = rows[0].workload
    rows = [r for r in rows if r.workload == workload]
    quants = [q for q in QUANT_BACKEND if any(r.quant == q for r in rows)]
    groups = [g for g in GROUP_ORDER if any(g in r.by_group for r in rows)]
    groups += sorted({g for r in rows for g in r.by_group} - set(groups))
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    for ax, phase in zip(axes[0], ("decode", "prefill"), strict=True):
        mine = [r for r in rows if r.phase == phase]
        mine.sort(key=lambda r: (quants.index(r.quant), r.batch))
        labels = []
        for x, r in enumerate(mine):
            bottom = 0.0
            for gi, g in enumerate(groups):
                v = r.by_group.get(g, 0.0)
                ax.bar(x, v, bottom=bottom, color=colors(gi), label=g if x == 0 else None)
                bottom += v
            if r.measured_j_per_token is not None:
                rest = max(0.0, r.measured_j_per_token - bottom)
                ax.bar(x, rest, bottom=bottom, color="none", edgecolor="grey", hatch="//",
                       label="remainder" if x == 0 else None)
                ax.plot([x - 0.4, x + 0.4], [r.measured_j_per_token] * 2, color="black", lw=2,
                        label="measured" if x == 0 else None)
            labels.append(f"{r.quant}\nB={r.batch}")
        ax.set_xticks(range(len(mine)), labels, fontsize=7)
        basis = "above idle" if above_idle else "total"
        ax.set_ylabel(f"J per {phase} token ({basis})")
        ax.set_title(f"{phase}: linear layers predicted from kernels vs measured")
        if mine:
            ax.legend(fontsize=7)
    fig.suptitle(f"workload {workload}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
