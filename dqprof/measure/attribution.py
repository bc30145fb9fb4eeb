"""Which kernels a call launched and their device time, grouped into categories.

CUPTI through torch.profiler, on eager calls (graph replays hide per-kernel records on some
CUPTI versions); device times of kernels do not depend on how they were launched.
"""

from __future__ import annotations

from collections.abc import Callable

from dqprof.measure.categories import SWEEP_CATEGORIES as CATEGORIES
from dqprof.measure.categories import sweep_category as categorize


def attribute(fns: list[Callable[[], object]], rounds: int = 2) -> list[dict]:
    """Kernels per call: [{name, category, time_s, count}], times and counts per call."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for fn in fns:  # first-call work (autotuning, lazy init) stays out of the profile
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            for fn in fns:
                fn()
        torch.cuda.synchronize()
    calls = rounds * len(fns)
    kernels = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "self_cuda_time_total", 0)
        if not dev_us or str(getattr(ev, "device_type", "")).split(".")[-1] != "CUDA":
            continue
        kernels.append({"name": ev.key[:200], "category": categorize(ev.key),
                        "time_s": dev_us / 1e6 / calls, "count": ev.count / calls})
    return sorted(kernels, key=lambda k: -k["time_s"])


def by_category(kernels: list[dict]) -> dict[str, float]:
    """Device seconds per call in each category (all present; unknown ones count as other)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for k in kernels:
        category = k.get("category")
        out[category if category in out else "other"] += k["time_s"]
    return out
