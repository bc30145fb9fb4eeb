"""Analysis of dqprof run folders: pure functions from records to tables and figures.

``load_run`` / ``load_runs`` read run folders, ``analyze`` computes what a report says about a
run, ``make_report`` writes report.html, summary.md and the plots. Notebooks call these.
Names load lazily, so ``dqprof`` commands that never analyse do not import pandas.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"Analysis": "compute", "analyze": "compute", "Run": "frame",
          "default_profile": "frame", "load_run": "frame", "load_runs": "frame",
          "notebook_run_dir": "frame",
          "make_report": "report"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'dqprof.analysis' has no attribute '{name}'")
    return getattr(import_module(f"dqprof.analysis.{_WHERE[name]}"), name)
