"""dqprof: kernel-level dequantization profiler.

``dqprof.load_run(path)``: a run folder's records as a pandas DataFrame (``dqprof.load``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_run", "__version__"]


def __getattr__(name: str) -> Any:
    # lazy: the CLI imports dqprof without paying for pandas
    if name == "load_run":
        from dqprof.load import load_run

        return load_run
    raise AttributeError(f"module 'dqprof' has no attribute '{name}'")
