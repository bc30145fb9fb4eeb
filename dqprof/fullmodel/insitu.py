"""One engine-step window of a torch.profiler trace -> device time per category per step (pure).

Input: the Chrome trace torch.profiler writes (``export_chrome_trace``): GPU activity as
complete events (``ph`` "X") of ``cat`` "kernel", "gpu_memcpy" or "gpu_memset", with ``ts`` and
``dur`` in microseconds; CUDA graph launches as "cuda_runtime"/"cuda_driver" events named
cudaGraphLaunch / cuGraphLaunch. Every kernel gets its category from the one map
(``dqprof.measure.categories.categorize``).

Which layer a GEMM belongs to. A kernel's name cannot tell q/k/v of one layer from those of
another (cuBLAS picks the same kernel for every sliding layer), and kernels replayed from a
CUDA graph carry no operator shapes (record_shapes sees only the graph launch). So the linear
kernels are assigned by their order within a step against the model's own order of linear
calls (``linear_sites``): a *linear run* is a maximal sequence of gemm/dequant/quantize kernels,
together with the cast/copy kernels between and right after them (bitsandbytes' copy of each
shard into the fused output, split-K reductions named as copies); consecutive linear calls of
Gemma 4 are always separated by a kernel of another kind (norm, attention, activation,
gather), so one run is one linear call. A window of F forward passes holds F x len(sites)
runs, and run j is site j mod len(sites). Under torch.compile one exception was seen in every
trace (H200, profiles/h200/session9/traces-bf16.tar.gz): Inductor schedules two independent
linears back to back, layer 0's qkv_proj and per_layer_model_projection, so a pass holds one
run fewer (``adjacent_sites``). That run is split into its calls at its lead kernels (a GEMM or
dequantize kernel that is not a split-K reduction; one per call, or one per shard as
bitsandbytes runs them), the longer call going to the layer with more FLOPs; where the leads
fit neither, its time is split between the two layers by their FLOPs, and the record says so.
When the count is neither (a fused or a split linear, a path this rule does not know), the
linears are still measured, as one "unassigned" group, and the record says why.

Device idle is the window's span (first kernel start to last kernel end) minus the union of
kernel intervals; the named categories are everything but "other".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from dqprof.measure.categories import STEP_CATEGORIES, categorize
from dqprof.models.config import ModelConfig
from dqprof.models.shapes import LinearShape, linear_shapes

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")
LINEAR_CORE = ("gemm", "dequant", "quantize")
LINEAR_GLUE = ("cast/copy",)
UNASSIGNED = "linear (unassigned)"
MAX_KERNELS = 200_000  # a window holding more is cut to this many (in time order)


@dataclass(frozen=True)
class Kernel:
    name: str
    ts: float  # start, microseconds
    dur: float  # microseconds
    category: str


def kernels_from_trace(trace: dict[str, Any]) -> tuple[list[Kernel], int]:
    """(GPU kernels and copies in time order, number of CUDA graph launches seen)."""
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    kernels, launches = [], 0
    for e in events:
        if not isinstance(e, dict) or e.get("ph") != "X":
            continue
        cat, name = e.get("cat", ""), str(e.get("name", ""))
        if cat in GPU_CATS:
            kernels.append(Kernel(name, float(e["ts"]), float(e.get("dur", 0.0)),
                                  categorize(name)))
        elif cat in ("cuda_runtime", "cuda_driver") and name.startswith(GRAPH_LAUNCHES):
            launches += 1
    kernels.sort(key=lambda k: k.ts)
    return kernels, launches


def linear_runs(kernels: list[Kernel]) -> list[list[int]]:
    """Indices of the kernels of each linear call, in order (see the module docstring)."""
    runs: list[list[int]] = []
    cur: list[int] | None = None
    for i, k in enumerate(kernels):
        if k.category in LINEAR_CORE:
            cur = cur if cur is not None else []
            cur.append(i)
        elif k.category in LINEAR_GLUE and cur is not None:
            cur.append(i)
        elif cur is not None:
            runs.append(cur)
            cur = None
    if cur:
        runs.append(cur)
    return runs


def linear_sites(cfg: ModelConfig) -> list[LinearShape]:
    """The linear calls of one forward pass, in execution order, as vLLM 0.20.2 runs them.

    Gemma 4: per_layer_model_projection (before the layers), then per layer qkv_proj, o_proj,
    gate_up_proj, down_proj, per_layer_input_gate, per_layer_projection (Gemma4DecoderLayer
    .forward), then lm_head (compute_logits, after the model). Dense models: qkv, o, gate_up,
    down per layer, then lm_head.
    """
    shapes = {s.name: s for s in linear_shapes(cfg)}
    layers = int(cfg.get("num_hidden_layers"))
    types = list(cfg.get("layer_types") or ["dense"] * layers)
    sites: list[LinearShape] = []
    if "ple.per_layer_model_projection" in shapes:
        sites.append(shapes["ple.per_layer_model_projection"])
    for t in types:
        prefix = {"sliding_attention": "sliding.", "full_attention": "full."}.get(t, "attn.")
        for name in (f"{prefix}qkv_proj", f"{prefix}o_proj", "mlp.gate_up_proj",
                     "mlp.down_proj", "ple.per_layer_input_gate", "ple.per_layer_projection"):
            if name in shapes:
                sites.append(shapes[name])
    return sites + [shapes["lm_head"]]


def adjacent_sites(sites: list[LinearShape]) -> list[tuple[int, int]]:
    """Pairs of sites (i, i + 1) that a compiled graph may run back to back, in either order,
    with no kernel of another kind between them: Gemma 4's per_layer_model_projection and the
    first layer's qkv_proj (both read the embeddings only)."""
    if len(sites) > 1 and sites[0].name == "ple.per_layer_model_projection" \
            and sites[1].name.endswith("qkv_proj"):
        return [(0, 1)]
    return []


def _leads(run: list[int], kernels: list[Kernel]) -> list[int]:
    """Positions in ``run`` where a call's own GEMM/dequantize kernel starts (not a reduce)."""
    return [p for p, i in enumerate(run) if kernels[i].category in LINEAR_CORE
            and "reduce" not in kernels[i].name.lower()]


def _split_pair(run: list[int], kernels: list[Kernel], a: LinearShape, b: LinearShape
                ) -> tuple[dict[int, list[tuple[LinearShape, float]]], bool]:
    """One run holding the calls of sites a and b -> each kernel's site shares; True when the
    split is by kernel, False when by FLOPs.

    By kernel where the run's lead kernels are one per call (fused paths) or one per shard
    (bitsandbytes' GEMV per shard): of the two orders the run could hold, the one whose
    split gives the longer part to the layer with more FLOPs, the closer to their FLOP
    ratio."""
    big, small = (a, b) if a.n * a.k >= b.n * b.k else (b, a)
    leads = _leads(run, kernels)
    want = big.n * big.k / (small.n * small.k)
    best: tuple[float, list[int], list[int]] | None = None
    for first, second in ((big, small), (small, big)):
        # (leads of the first call, leads of both): one a call, or one a shard
        for n_first, n_total in ((1, 2), (len(first.shards),
                                          len(first.shards) + len(second.shards))):
            if len(leads) != n_total or n_first >= len(leads):
                continue
            cut = leads[n_first]
            part_first, part_second = run[:cut], run[cut:]
            t = [sum(kernels[i].dur for i in part) for part in (part_first, part_second)]
            t_big, t_small = (t[0], t[1]) if first is big else (t[1], t[0])
            if t_big < t_small or t_small <= 0:
                continue
            miss = abs(math.log(t_big / t_small / want))
            if best is None or miss < best[0]:
                best = (miss, *((part_first, part_second) if first is big
                                else (part_second, part_first)))
    if best is not None:
        _, long_, short = best
        return ({**{i: [(big, 1.0)] for i in long_}, **{i: [(small, 1.0)] for i in short}},
                True)
    fb = big.n * big.k / (big.n * big.k + small.n * small.k)
    return {i: [(big, fb), (small, 1.0 - fb)] for i in run}, False


@dataclass
class StepProfile:
    """One profiled window: seconds per forward pass (step) by category."""

    phase: str  # decode or prefill
    status: str  # ok or failed
    reason: str | None = None
    steps: int = 0  # forward passes in the window
    engine_steps: int = 0  # engine.step() calls profiled
    tokens_per_step: float | None = None
    kernels: int = 0
    graph_launches: int = 0
    cut: str | None = None  # why and where the trace was cut
    span_s: float | None = None  # per step: first kernel start to last kernel end / steps
    busy_s: float | None = None  # per step: union of kernel intervals
    idle_s: float | None = None  # per step: span - busy
    host_s: float | None = None  # per step: host wall time of the window / steps
    categories: dict[str, float] = field(default_factory=dict)  # outside linear calls, s/step
    linear_by_group: dict[str, float] = field(default_factory=dict)  # s/step
    linear_by_layer: dict[str, float] = field(default_factory=dict)  # shape name -> s/step
    linear_kernels: dict[str, float] = field(default_factory=dict)  # category in linears
    linear_calls_per_step: float | None = None
    assignment: str = ""  # how GEMMs were matched to layers (or why they were not)
    named_fraction: float | None = None  # (named categories + linears + idle) / span
    other_kernels: dict[str, float] = field(default_factory=dict)  # the largest unnamed, s/step

    @property
    def linear_s(self) -> float:
        return sum(self.linear_by_group.values())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _union_s(kernels: list[Kernel]) -> float:
    busy, end = 0.0, None
    for k in kernels:  # time order
        s, e = k.ts, k.ts + k.dur
        if end is None or s >= end:
            busy += k.dur
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy / 1e6


def _cut(kernels: list[Kernel], max_kernels: int) -> tuple[list[Kernel], str | None]:
    if len(kernels) <= max_kernels:
        return kernels, None
    return kernels[:max_kernels], (f"trace cut: kept the first {max_kernels} of "
                                   f"{len(kernels)} GPU events")


def analyze(trace: dict[str, Any], sites: list[LinearShape], phase: str, engine_steps: int,
            host_s: float, tokens_in_window: float | None = None,
            max_kernels: int = MAX_KERNELS) -> StepProfile:
    """The window's per-step breakdown (status failed, with the reason, when unusable)."""
    kernels, launches = kernels_from_trace(trace)
    prof = StepProfile(phase, "ok", engine_steps=engine_steps, kernels=len(kernels),
                       graph_launches=launches)
    if not kernels:
        prof.status = "failed"
        prof.reason = (f"the profiler saw {launches} CUDA graph launches and no kernel inside "
                       f"them (CUPTI does not report graph kernels here)" if launches
                       else "the profiler recorded no GPU kernel in the window")
        return prof
    kernels, prof.cut = _cut(kernels, max_kernels)
    runs = linear_runs(kernels)
    if not runs:
        prof.status = "failed"
        prof.reason = (f"no GEMM among the {len(kernels)} kernels recorded"
                       + (f" ({launches} graph launches: the profiler may see only "
                          f"part of the graphs)" if launches else ""))
        return prof
    per_fwd = len(sites)
    pairs = adjacent_sites(sites)
    merged = bool(pairs) and (len(runs) % per_fwd != 0 if not prof.cut
                              else len(_leads(runs[0], kernels)) >= 2)
    per_pass = per_fwd - 1 if merged else per_fwd
    if prof.cut:  # keep whole forward passes only
        whole = (len(runs) // per_pass) * per_pass
        if whole:
            stop = runs[whole][0] if whole < len(runs) else len(kernels)
            kernels, runs = kernels[:stop], runs[:whole]
            prof.cut += f"; {whole // per_pass} whole forward passes analysed"
    # each linear kernel -> [(site, share of its time)]
    share: dict[int, list[tuple[LinearShape | None, float]]] = {}
    if len(runs) % per_pass == 0:
        steps = len(runs) // per_pass
        prof.assignment = (f"by order: {len(runs)} linear calls = {steps} forward passes x "
                           f"{per_pass} linear calls of the model")
        a = pairs[0][0] if merged else None
        by_kernel = True
        for j, run in enumerate(runs):
            r = j % per_pass
            if a is not None and r == a:
                split, ok = _split_pair(run, kernels, sites[a], sites[a + 1])
                share.update(split)
                by_kernel &= ok
                continue
            site = sites[r + 1 if a is not None and r > a else r]
            share.update({i: [(site, 1.0)] for i in run})
        if merged:
            x, y = sites[pairs[0][0]].name, sites[pairs[0][1]].name
            prof.assignment += (f" ({x} and {y} run back to back as one: split "
                                + ("by kernel, the longer call to the layer with more FLOPs)"
                                   if by_kernel else "by the two layers' FLOPs, an estimate)"))
    else:
        steps = max(1, engine_steps)
        prof.assignment = (f"not by layer: {len(runs)} linear calls are not a multiple of the "
                           f"model's {per_fwd} per forward pass; {steps} engine steps assumed")
        share = {i: [(None, 1.0)] for run in runs for i in run}
    prof.steps = steps
    cats = {c: 0.0 for c in STEP_CATEGORIES}
    groups: dict[str, float] = {}
    layers: dict[str, float] = {}
    lin_kernels: dict[str, float] = {}
    other: dict[str, float] = {}
    for i, k in enumerate(kernels):
        s = k.dur / 1e6 / steps
        parts = share.get(i)
        if parts is None:
            cats[k.category] = cats.get(k.category, 0.0) + s
            if k.category == "other":
                other[k.name[:160]] = other.get(k.name[:160], 0.0) + s
            continue
        for site, f in parts:
            g = site.group if site else UNASSIGNED
            groups[g] = groups.get(g, 0.0) + s * f
            if site:
                layers[site.name] = layers.get(site.name, 0.0) + s * f
        lin_kernels[k.category] = lin_kernels.get(k.category, 0.0) + s
    span = (max(k.ts + k.dur for k in kernels) - kernels[0].ts) / 1e6
    busy = _union_s(kernels)
    prof.span_s, prof.busy_s = span / steps, busy / steps
    prof.idle_s = max(0.0, span - busy) / steps
    prof.host_s = host_s / steps if host_s else None
    prof.categories = {c: v for c, v in cats.items() if v}
    prof.linear_by_group, prof.linear_by_layer = groups, layers
    prof.linear_kernels = lin_kernels
    prof.other_kernels = dict(sorted(other.items(), key=lambda kv: -kv[1])[:5])
    prof.linear_calls_per_step = len(runs) / steps
    named = sum(v for c, v in prof.categories.items() if c != "other") + prof.linear_s
    prof.named_fraction = (named + prof.idle_s) / prof.span_s if prof.span_s else None
    if tokens_in_window is not None:
        prof.tokens_per_step = tokens_in_window / steps
    return prof


def failed(phase: str, reason: str) -> StepProfile:
    return StepProfile(phase, "failed", reason)
