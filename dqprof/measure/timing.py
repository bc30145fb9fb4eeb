"""Time one GEMM call: a CUDA graph over rotated weight copies, replayed many times.

The graph holds one call per weight copy, so consecutive calls never hit the weights the
previous call left in L2 (``hot`` mode holds one copy called repeatedly). Replays remove
launch gaps, which matter at decode sizes where a call lasts a few microseconds. Where capture
fails (a path that syncs or allocates on the host), calls run eagerly and the record says so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

MIN_SAMPLE_S = 2e-3  # one timing sample spans at least this much device time


@dataclass
class TimeStats:
    median_s: float  # per call
    min_s: float
    max_s: float
    q1_s: float
    q3_s: float
    samples: int
    calls_per_sample: int

    @property
    def rel_spread(self) -> float:
        """Interquartile range over the median: the noise band the regression gate uses."""
        return (self.q3_s - self.q1_s) / self.median_s if self.median_s else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "rel_spread": self.rel_spread}


def summarize(per_call: list[float], calls_per_sample: int) -> TimeStats:
    qs = statistics.quantiles(per_call, n=4) if len(per_call) > 1 else [per_call[0]] * 3
    return TimeStats(statistics.median(per_call), min(per_call), max(per_call), qs[0], qs[2],
                     len(per_call), calls_per_sample)


class Replay:
    """Runs all rotated calls once per ``__call__``; ``calls`` says how many that is."""

    def __init__(self, fns: list[Callable[[], object]], device: str, use_graph: bool = True):
        self.fns = fns
        self.calls = len(fns)
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        if device == "cuda" and use_graph:
            self._capture()

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):  # warm-up outside capture (allocator, handles)
                for fn in self.fns:
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._outputs = [fn() for fn in self.fns]  # keep outputs alive with the graph
            self.graph = graph
        except Exception as e:  # not capturable: fall back to eager launches
            self.graph_error = f"{type(e).__name__}: {e}"[:300]
            torch.cuda.synchronize()

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            for fn in self.fns:
                fn()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def replay_seconds(replay: Replay) -> float:
    """Host wall time of one pass, GPU work included (the second of two: the first warms)."""
    replay()
    replay.sync()
    t0 = time.perf_counter()
    replay()
    replay.sync()
    return time.perf_counter() - t0


def time_replay(replay: Replay, repeats: int, warmup: int = 3,
                pass_s: float | None = None) -> TimeStats:
    """Median per-call time over ``repeats`` samples, each long enough to time reliably.

    ``pass_s``: one pass's host time, already measured (``replay_seconds``, which also warmed
    the replay): a sample is sized from it instead of timing a pass again.
    """
    for _ in range(warmup):
        replay()
    replay.sync()
    one = pass_s
    if one is None:  # size a sample: replays needed for MIN_SAMPLE_S
        t0 = time.perf_counter()
        replay()
        replay.sync()
        one = time.perf_counter() - t0
    per_sample = max(1, int(MIN_SAMPLE_S / max(one, 1e-7)))
    calls = per_sample * replay.calls
    if replay.device != "cuda":
        per_call = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(per_sample):
                replay()
            per_call.append((time.perf_counter() - t0) / calls)
        return summarize(per_call, calls)
    # All samples are queued back to back behind one priming replay and read after a single
    # sync: the GPU never waits for the host between samples, so a large graph's launch
    # latency stays out of every sample.
    replay()
    marks = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(per_sample):
            replay()
        end.record()
        marks.append((begin, end))
    marks[-1][1].synchronize()
    return summarize([b.elapsed_time(e) / 1e3 / calls for b, e in marks], calls)
