"""Profile a few engine steps of a real generate() call inside the vLLM worker (GPU side).

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, one GPU), so CUPTI,
through torch.profiler with CUDA activity only, sees the model's kernels, those replayed from
CUDA graphs included (CUDA 12+ reports each kernel of a graph launch). The window is a range
of ``llm_engine.step()`` calls of an ordinary ``LLM.generate`` (the same call the energy
windows time): the step method is wrapped for the one call, the device is synchronized
before the first profiled step and after the last, and the profiler runs only in between,
never inside an energy window. Its overhead (host callbacks per launch) inflates host time
and device idle of the profiled steps a little; kernel durations are the device's own.

Which steps: decode is profiled at the middle of the output (the attention context there is
the call's average), prefill from the first step of a max_tokens=1 call. With async
scheduling a step's host work overlaps the previous step's kernels; the count of forward
passes comes from the trace itself (``insitu.analyze``), not from the steps called.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqprof.fullmodel.insitu import MAX_KERNELS, StepProfile, analyze, failed
from dqprof.models.shapes import LinearShape

METHOD = ("torch.profiler (CUDA activity) over engine steps of one generate() call, outside "
          "the energy windows; decode at the middle of the output, prefill from the first "
          "step; linear kernels matched to layers by their order in a forward pass")


@dataclass
class ProfileOptions:
    enabled: bool = True
    decode_steps: int = 8
    prefill_steps: int = 4
    max_kernels: int = MAX_KERNELS
    keep_traces: bool = False


@dataclass
class Window:
    start: int  # first engine step profiled (0-based)
    steps: int  # engine steps to profile
    tokens: float | None = None  # tokens the window's forward passes process (prefill)
    notes: list[str] = field(default_factory=list)


def prefill_steps(batch: int, input_len: int, chunk: int | None) -> int:
    """Engine steps vLLM needs to prefill ``batch`` prompts in chunks of ``chunk`` tokens."""
    return max(1, math.ceil(batch * input_len / chunk)) if chunk else 1


def decode_window(batch: int, input_len: int, output_len: int, chunk: int | None,
                  steps: int) -> Window:
    """The decode steps at the middle of a (batch, input_len, output_len) call."""
    first = prefill_steps(batch, input_len, chunk)  # their last step samples token 1
    decode = output_len - 1
    n = max(1, min(steps, decode))
    start = first + max(0, (decode - n) // 2)
    return Window(start, n)


def prefill_window(batch: int, input_len: int, chunk: int | None, steps: int) -> Window:
    total = prefill_steps(batch, input_len, chunk)
    n = max(1, min(steps, total))
    tokens = float(batch * input_len if n == total else n * (chunk or batch * input_len))
    return Window(0, n, tokens)


class StepTap:
    """Wraps ``engine.step`` for one call: profiles steps [start, start + steps)."""

    def __init__(self, engine: Any, window: Window, sync: Callable[[], None],
                 make_profiler: Callable[[], Any], clock: Callable[[], float] = time.perf_counter):
        self.engine, self.window, self.sync = engine, window, sync
        self.make_profiler, self.clock = make_profiler, clock
        self.calls = 0
        self.profiled = 0
        self.prof: Any = None
        self.host_s = 0.0
        self._t0 = 0.0
        self._orig = engine.step

    def _step(self) -> Any:
        w = self.window
        if self.calls == w.start and self.prof is None:
            self.sync()
            self.prof = self.make_profiler()
            self.prof.start()
            self._t0 = self.clock()
        out = self._orig()
        self.calls += 1
        if self.prof is not None and self.profiled < w.steps:
            self.profiled += 1
            if self.profiled == w.steps:
                self._stop()
        return out

    def _stop(self) -> None:
        self.sync()
        self.host_s = self.clock() - self._t0
        self.prof.stop()

    def __enter__(self) -> StepTap:
        self.engine.step = self._step
        return self

    def __exit__(self, *exc: Any) -> None:
        self.engine.step = self._orig
        if self.prof is not None and self.profiled < self.window.steps:
            self._stop()  # the call ended early: what was profiled is kept


def _torch_profiler() -> Any:
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CUDA])


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def profile_call(engine: Any, run_call: Callable[[], Any], window: Window,
                 sites: list[LinearShape], phase: str, opts: ProfileOptions,
                 trace_path: Path | None = None, tokens_per_step: float | None = None,
                 make_profiler: Callable[[], Any] = _torch_profiler,
                 sync: Callable[[], None] = _sync) -> StepProfile:
    """Run ``run_call()`` with steps of ``window`` profiled; a failure is returned, not raised."""
    keep = opts.keep_traces and trace_path is not None
    path = trace_path
    try:
        with StepTap(engine, window, sync, make_profiler) as tap:
            run_call()
        if tap.prof is None:
            return failed(phase, f"the call made {tap.calls} engine steps; the window starts "
                                 f"at step {window.start}")
        if path is None:
            fd, tmp = tempfile.mkstemp(suffix=".json", prefix="dqprof-trace-")
            os.close(fd)
            path = Path(tmp)
        tap.prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    except Exception as e:  # a profiler that cannot attach: recorded, the run goes on
        return failed(phase, f"profiler: {type(e).__name__}: {e}".splitlines()[0][:300])
    finally:
        if path is not None and not keep:
            path.unlink(missing_ok=True)
    tokens = window.tokens
    prof = analyze(trace, sites, phase, tap.profiled, tap.host_s, tokens, opts.max_kernels)
    if tokens is None and tokens_per_step is not None and prof.status == "ok":
        prof.tokens_per_step = tokens_per_step
    return prof
