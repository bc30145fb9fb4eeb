"""The reconciliation figure for a run folder that also holds full-model results (model.jsonl):
the linear layers' J/token predicted from the run's kernel records against the J/token vLLM
measured (dqprof.fullmodel.reconcile holds the arithmetic)."""

from __future__ import annotations

from matplotlib.figure import Figure

from dqprof.analysis.frame import Run
from dqprof.errors import DqprofError
from dqprof.models.config import load_config
from dqprof.models.shapes import linear_shapes


def reconciliation_figure(run: Run, prefix: str = "") -> tuple[dict[str, tuple[Figure, str]],
                                                               list[str]]:
    """({name: (figure, caption)}, left out): empty when the folder has no model.jsonl."""
    from dqprof.fullmodel.plot import plot_reconciliation
    from dqprof.fullmodel.reconcile import reconcile
    from dqprof.fullmodel.records import MODEL_FILE, latest, load_model_records

    if not (run.path / MODEL_FILE).exists():
        return {}, []
    try:
        model_records = latest(load_model_records(run.path))
        shapes = linear_shapes(load_config(run.model))
    except DqprofError as e:
        return {}, [f"reconciliation: {e}"]
    rows = reconcile(model_records, run.records, shapes)
    decode = [r for r in rows if r.phase == "decode" and r.explained_fraction is not None]
    if not decode:
        return {}, ["reconciliation: no ok full-model record with a kernel prediction"]
    fig = plot_reconciliation(model_records, run.records, shapes, workload=decode[0].workload)
    explained = "; ".join(f"{r.quant} B={r.batch}: {r.explained_fraction:.0%}"
                          for r in decode if r.workload == decode[0].workload)
    caption = (f"Full model ({decode[0].workload}): linear layers' J/token predicted from this "
               f"run's kernel records (stacked by group) against vLLM's measured J/token "
               f"(black); hatched: the remainder (attention, norms, embeddings/PLE gathers, "
               f"sampling, idle). Decode explained: {explained}.")
    return {prefix + "reconciliation": (fig, caption)}, []
