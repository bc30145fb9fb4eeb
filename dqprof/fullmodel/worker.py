"""One quantization in one process: ``python -m dqprof.fullmodel.worker SPEC.json``.

Measures idle power, starts one vLLM engine (in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0),
then runs every point of the spec (warm-up, full window, prefill window) and appends one
record per point to model.jsonl. The runner gives each quantization its own process so a
crash, an OOM or a hang costs that quantization only, and GPU memory is returned between them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dqprof.fullmodel.energy import TickMeter, measure_window
from dqprof.fullmodel.records import ModelRecordWriter, base_record
from dqprof.fullmodel.workload import (
    SPLIT_METHOD,
    Point,
    WindowRule,
    Workload,
    derive,
    make_prompts,
    point_fits,
)

ENGINE_MODES = ("default", "graphs", "eager")
BACKEND_PATTERNS = (re.compile(r"Using (?:AttentionBackendEnum\.)?([A-Z][A-Z0-9_]+) "
                               r"(?:attention )?backend"),
                    re.compile(r"Forcing ([A-Z][A-Z0-9_]+)"))
# vLLM names the mixed-precision GEMM it picked, e.g. "Using MacheteLinearKernel for
# GPTQMarlinLinearMethod" (Hopper) or "Using MarlinLinearKernel for ..." (elsewhere)
# "Selected CutlassFP8ScaledMMLinearKernel for Fp8OnlineLinearMethod" (FP8 on sm_90), and
# dqprof_nf4's own "Using TritonNf4LinearKernel for DqprofNf4LinearMethod"
LINEAR_KERNEL = re.compile(r"(?:Using|Selected) (\w+?)LinearKernel for")
# vLLM's log lines that open each phase of an engine start, in order (the worker's display)
PHASES = (("Loading weights with BitsAndBytes", "loading and quantizing (bitsandbytes)"),
          ("dqprof_nf4: quantizing", "quantizing (dqprof_nf4)"),
          ("Model loading took", "compiling"),
          ("Dynamo bytecode transform", "compiling"),
          ("Graph capturing finished", "starting engine (KV cache)"))
FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada, Hopper and later


@dataclass
class WorkerSpec:
    run_dir: str
    model_path: str
    model_name: str
    quant: str
    vllm_quantization: str | None
    vocab: int
    points: list[dict[str, Any]]  # {workload, input_len, output_len, batch}
    window: dict[str, Any] = field(default_factory=dict)  # WindowRule fields
    warmup_calls: int = 1
    seed: int = 0
    engine: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=lambda: {
        "temperature": 1.0, "top_p": 0.95, "top_k": 64})
    deadline: float | None = None  # unix time after which no point starts
    energy: bool = True
    info_path: str = ""
    profile: dict[str, Any] = field(default_factory=dict)  # stepprof.ProfileOptions fields

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> WorkerSpec:
        return cls(**json.loads(Path(path).read_text()))

    def plan(self) -> list[Point]:
        return [Point(Workload(p["workload"], p["input_len"], p["output_len"]), p["batch"])
                for p in self.points]


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[int]:
        """Run one batch; the number of tokens generated for each prompt."""


def parse_attention_backend(messages: list[str]) -> str | None:
    """The attention backend vLLM reports choosing, from its log lines (last one wins)."""
    found = None
    for m in messages:
        for pat in BACKEND_PATTERNS:
            if hit := pat.search(m):
                found = hit.group(1)
    return found


def parse_linear_kernel(messages: list[str]) -> str | None:
    """The quantized-linear kernel vLLM reports choosing ("Machete", "Marlin", ...), or None."""
    found = None
    for m in messages:
        if hit := LINEAR_KERNEL.search(m):
            found = hit.group(1)
    return found


def fp8_unsupported(capability: str | None) -> str | None:
    """Why vLLM's fp8 (W8A8) path cannot run on a GPU of this compute capability, or None."""
    try:
        major, minor = (int(v) for v in str(capability).split(".")[:2])
    except ValueError:
        return None  # unknown: let vLLM decide
    if (major, minor) >= FP8_MIN_CAPABILITY:
        return None
    return (f"fp8 needs FP8 tensor cores (compute capability 8.9+); this GPU is {major}.{minor}, "
            f"where vLLM would run weight-only FP8 Marlin instead")


def linear_methods(model: Any) -> dict[str, str]:
    """{module name: its quant method's class} for every linear and embedding of a model."""
    out = {}
    for name, m in model.named_modules():
        kinds = {c.__name__ for c in type(m).__mro__}
        qm = getattr(m, "quant_method", None)
        if qm is not None and kinds & {"LinearBase", "VocabParallelEmbedding"}:
            out[name] = type(qm).__name__
    return out


def summarize_methods(methods: dict[str, str]) -> dict[str, dict[str, int]]:
    """{method: {module name with layer indices folded: count}}."""
    from dqprof.fullmodel.plugin import summarize

    by: dict[str, list[str]] = {}
    for name, method in methods.items():
        by.setdefault(method, []).append(name)
    return {m: summarize(names) for m, names in sorted(by.items())}


class _Capture(logging.Handler):
    def __init__(self, on_phase: Callable[[str], None] | None = None) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.on_phase = on_phase

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed log call must not break the run
            return
        if "backend" in msg.lower() or "Forcing" in msg or "LinearKernel" in msg:
            self.messages.append(msg)
        if self.on_phase is not None:
            for marker, phase in PHASES:
                if marker in msg:
                    self.on_phase(phase)


def _dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


class VllmEngine:
    """vLLM's offline LLM on token-id prompts (no tokenizer), one engine for every point."""

    def __init__(self, spec: WorkerSpec, on_phase: Callable[[str], None] | None = None):
        import vllm
        from vllm import LLM, SamplingParams

        if spec.vllm_quantization == "dqprof_nf4":
            from dqprof.fullmodel.plugin import register

            register()  # a source checkout has no installed entry point to do it
        self._sp = SamplingParams
        self.sampling = spec.sampling
        self.capture = _Capture(on_phase)
        vlog = logging.getLogger("vllm")  # after the import: vLLM has configured it
        vlog.addHandler(self.capture)
        if vlog.getEffectiveLevel() > logging.INFO:  # the backend choice is logged at INFO
            vlog.setLevel(logging.INFO)
        e = spec.engine
        kwargs: dict[str, Any] = dict(
            model=spec.model_path, quantization=spec.vllm_quantization, dtype="bfloat16",
            skip_tokenizer_init=True, seed=spec.seed, max_model_len=e["max_model_len"],
            max_num_seqs=e["max_num_seqs"], enable_prefix_caching=False,
            gpu_memory_utilization=e.get("gpu_memory_utilization", 0.85))
        mode = e.get("mode", "default")
        if mode == "eager":
            kwargs["enforce_eager"] = True
        else:
            # capture decode graphs only for the batch sizes the run uses: faster start
            cc: dict[str, Any] = {"cudagraph_capture_sizes": e["cudagraph_capture_sizes"]}
            if mode == "graphs":  # no torch.compile, full CUDA graphs for decode steps
                cc.update(mode="NONE", cudagraph_mode="FULL_DECODE_ONLY")
            kwargs["compilation_config"] = cc
        self.kwargs = {k: v for k, v in kwargs.items()}
        self.version = vllm.__version__
        self.llm = LLM(**kwargs)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[int]:
        sp = self._sp(max_tokens=max_tokens, ignore_eos=True, detokenize=False, **self.sampling)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp,
                                 use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    def profile(self, prompts: list[list[int]], max_tokens: int, window: Any, sites: list,
                phase: str, opts: Any, tokens_per_step: float | None,
                trace_path: Path | None = None) -> Any:
        """One generate call with the steps of ``window`` profiled (stepprof)."""
        from dqprof.fullmodel.stepprof import profile_call

        return profile_call(self.llm.llm_engine, lambda: self.generate(prompts, max_tokens),
                            window, sites, phase, opts, trace_path,
                            tokens_per_step=tokens_per_step)

    def modules(self) -> dict[str, Any]:
        """What each linear and embedding runs on ({} where vLLM cannot say)."""
        out: dict[str, Any] = {}
        try:
            out["linear_methods"] = summarize_methods(self.llm.apply_model(linear_methods)[0])
        except Exception as e:  # an older or changed vLLM: recorded, the run goes on
            out["linear_methods_error"] = f"{type(e).__name__}: {e}"[:300]
        if self.kwargs.get("quantization") == "dqprof_nf4":
            from dqprof.fullmodel.plugin import REPORT, summarize

            out["dqprof_nf4"] = {"quantized": summarize(list(REPORT["quantized"])),
                                 "left_bf16": dict(REPORT["bf16"])}
        return out

    def info(self) -> dict[str, Any]:
        vc = _dig(self.llm, "llm_engine.vllm_config")
        backend = _dig(vc, "attention_config.backend")
        return {
            "vllm_kwargs": {k: _plain(v) for k, v in self.kwargs.items()},
            "attention_backend": (str(backend).split(".")[-1] if backend is not None else None)
            or parse_attention_backend(self.capture.messages),
            "attention_log": self.capture.messages[-5:],
            "linear_kernel": parse_linear_kernel(self.capture.messages),
            "quantization": _plain(_dig(vc, "model_config.quantization")),
            "dtype": _plain(_dig(vc, "model_config.dtype")),
            "max_num_batched_tokens": _plain(_dig(vc, "scheduler_config.max_num_batched_tokens")),
            "max_num_seqs": _plain(_dig(vc, "scheduler_config.max_num_seqs")),
            "compilation_mode": _plain(_dig(vc, "compilation_config.mode")),
            "cudagraph_mode": _plain(_dig(vc, "compilation_config.cudagraph_mode")),
            "cudagraph_capture_sizes": _plain(
                _dig(vc, "compilation_config.cudagraph_capture_sizes")),
            "kv_cache_dtype": _plain(_dig(vc, "cache_config.cache_dtype")),
            "num_gpu_blocks": _plain(_dig(vc, "cache_config.num_gpu_blocks")),
        }


def imported_versions() -> dict[str, str | None]:
    """Versions of the modules this process actually imports (PYTHONPATH order decides)."""
    out: dict[str, str | None] = {}
    for name in ("vllm", "torch", "transformers", "bitsandbytes", "triton"):
        try:
            out[name] = getattr(__import__(name), "__version__", None)
        except Exception:  # missing or broken: recorded as absent
            out[name] = None
    return out


def _caller(engine: Engine, spec: WorkerSpec, idx: int, point: Point, max_tokens: int,
            salt: tuple[int, int]) -> Callable[[int], tuple[int, int]]:
    """call(i) runs generate call i of one phase on fresh prompts; -> (tokens in, out)."""
    b, w = point.batch, point.workload

    def call(i: int) -> tuple[int, int]:
        prompts = make_prompts(b, w.input_len, spec.vocab, spec.seed, (idx, *salt, i))
        counts = engine.generate(prompts, max_tokens)
        if len(counts) != b or any(c != max_tokens for c in counts):
            raise RuntimeError(f"generate returned {sum(counts)} tokens over {len(counts)} "
                               f"prompts, expected {b} x {max_tokens}")
        return b * w.input_len, sum(counts)

    return call


def measure_point(engine: Engine, spec: WorkerSpec, idx: int, point: Point, rule: WindowRule,
                  meter: TickMeter | None, idle_w: float | None,
                  clock: Callable[[], float] = time.perf_counter,
                  wall: Callable[[], float] = time.time) -> dict[str, Any]:
    """Warm-up, budget check, both windows: the record's status and figures."""
    out_len = point.workload.output_len
    remaining = spec.deadline - wall() if spec.deadline else None
    if remaining is not None and remaining < 2 * rule.min_s:
        return {"status": "skipped", "reason": f"time budget: {remaining:.0f} s left, a point "
                                               f"needs two windows of {rule.min_s:g} s"}
    warm = {}
    for phase, max_tokens, name in ((0, out_len, "full"), (1, 1, "prefill")):
        call, t = _caller(engine, spec, idx, point, max_tokens, (phase, 1)), clock()
        for i in range(spec.warmup_calls):
            call(i)
        warm[name] = (clock() - t) / max(1, spec.warmup_calls)
    remaining = spec.deadline - wall() if spec.deadline else None
    if remaining is not None and not point_fits(remaining, rule, warm["full"], warm["prefill"]):
        return {"status": "skipped", "warmup_s_per_call": warm,
                "reason": f"time budget: {remaining:.0f} s left, calls of {warm['full']:.2f} s "
                          f"and {warm['prefill']:.2f} s do not fit two windows"}
    full = measure_window(_caller(engine, spec, idx, point, out_len, (0, 0)), rule, meter,
                          idle_w, clock)
    prefill = measure_window(_caller(engine, spec, idx, point, 1, (1, 0)), rule, meter,
                             idle_w, clock)
    return {"status": "ok", "reason": None, "warmup_s_per_call": warm,
            "windows": {"full": full.as_dict(), "prefill": prefill.as_dict()},
            **derive(point, full, prefill, idle_w),
            "method": {"window_min_s": rule.min_s, "window_min_ticks": rule.min_ticks,
                       "warmup_calls": spec.warmup_calls, "split": SPLIT_METHOD,
                       "energy": ("NVML counter, tick-aligned window, idle gaps at its ends "
                                  "removed at idle power") if meter else None},
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall()))}


class InSitu:
    """Profiles a point's decode and prefill steps after its energy windows (stepprof)."""

    def __init__(self, spec: WorkerSpec, sites: list, chunk: int | None):
        from dqprof.fullmodel.stepprof import ProfileOptions

        self.spec, self.sites, self.chunk = spec, sites, chunk
        self.opts = ProfileOptions(**spec.profile)

    def __call__(self, engine: Any, idx: int, point: Point) -> dict[str, Any]:
        from dqprof.fullmodel.stepprof import METHOD, decode_window, prefill_window

        b, w, o = point.batch, point.workload, self.opts
        dw = decode_window(b, w.input_len, w.output_len, self.chunk, o.decode_steps)
        pw = prefill_window(b, w.input_len, self.chunk, o.prefill_steps)
        out: dict[str, Any] = {"method": METHOD, "chunk_tokens": self.chunk}
        for phase, max_tokens, window, per_step in (("decode", w.output_len, dw, float(b)),
                                                    ("prefill", 1, pw, None)):
            prompts = make_prompts(b, w.input_len, self.spec.vocab, self.spec.seed,
                                   (idx, 2, int(phase == "prefill")))
            trace = None
            if o.keep_traces:
                trace = Path(self.spec.run_dir) / "logs" / "traces" / (
                    f"{self.spec.quant}-{w.name.replace(':', '_')}-b{b}-{phase}.json")
                trace.parent.mkdir(parents=True, exist_ok=True)
            prof = engine.profile(prompts, max_tokens, window, self.sites, phase, o, per_step,
                                  trace)
            out[phase] = prof.as_dict()
            out[phase]["window_first_step"] = window.start
        return out


def run_points(engine: Engine, spec: WorkerSpec, meter: TickMeter | None, idle_w: float | None,
               write: Callable[[dict[str, Any]], None], common: dict[str, Any],
               clock: Callable[[], float] = time.perf_counter,
               wall: Callable[[], float] = time.time,
               insitu: Callable[[Any, int, Point], dict[str, Any]] | None = None,
               phase: Callable[[str, int], None] | None = None) -> None:
    """One record per point of the spec, failures included."""
    rule = WindowRule(**spec.window)
    for idx, point in enumerate(spec.plan()):
        w = point.workload
        rec = {**base_record(spec.model_name, spec.quant, w.name, w.input_len, w.output_len,
                             point.batch), **common}
        if phase is not None:
            phase(f"measuring {point.label}", idx)
        try:
            rec.update(measure_point(engine, spec, idx, point, rule, meter, idle_w, clock, wall))
        except Exception as e:  # one bad point is recorded, the rest still run
            rec.update(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0][:500])
            write(rec)
            if "out of memory" in str(e).lower():
                raise  # the engine is unusable after an OOM; the runner records the rest
            continue
        if insitu is not None and rec["status"] == "ok":
            if phase is not None:
                phase(f"profiling {point.label}", idx)
            try:
                rec["in_situ"] = insitu(engine, idx, point)
            except Exception as e:  # the energy figures stand; the profile says why not
                rec["in_situ"] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
        write(rec)


def _open_meter(spec: WorkerSpec) -> tuple[TickMeter | None, Any, str | None]:
    if not spec.energy:
        return None, None, "energy disabled (--no-energy)"
    from dqprof.measure.nvml import open_nvml

    nvml, why = open_nvml(0)
    if nvml is None or not nvml.energy_supported:
        return None, nvml, why or "this GPU's NVML has no total-energy counter"
    return TickMeter(nvml.energy_mj), nvml, None


def _skip_all(spec: WorkerSpec, common: dict[str, Any], reason: str) -> None:
    with ModelRecordWriter(Path(spec.run_dir)) as writer:
        for p in spec.plan():
            w = p.workload
            writer.write({**base_record(spec.model_name, spec.quant, w.name, w.input_len,
                                        w.output_len, p.batch), **common,
                          "status": "skipped", "reason": reason})


def _sites(spec: WorkerSpec) -> list:
    from dqprof.fullmodel.insitu import linear_sites
    from dqprof.models.config import load_config

    return linear_sites(load_config(spec.model_path))


def main(argv: list[str]) -> int:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: one pid to kill
    spec = WorkerSpec.load(Path(argv[0]))
    info: dict[str, Any] = {"quant": spec.quant, "pid": os.getpid(), "started": time.time()}

    def save_info() -> None:
        if spec.info_path:
            tmp = Path(spec.info_path + ".tmp")  # the runner polls it: never a torn file
            tmp.write_text(json.dumps(info, indent=1, default=str))
            tmp.replace(spec.info_path)

    def set_phase(name: str, points_done: int | None = None) -> None:
        info["phase"], info["phase_started"] = name, time.time()
        if points_done is not None:
            info["points_done"] = points_done
        save_info()

    meter, nvml, why = _open_meter(spec)
    info["energy_note"] = why
    idle_w = meter.idle_power() if meter else None
    info["idle_power_w"] = idle_w
    if nvml is not None:
        info["nvml"] = nvml.static_info()
    try:
        from dqprof.measure.environment import gpu_info

        info["gpu"] = gpu_info()
    except Exception as e:  # no CUDA: vLLM will fail below and say why
        info["gpu"] = {"error": str(e)}
    if spec.vllm_quantization == "fp8" and (
            reason := fp8_unsupported(info["gpu"].get("capability"))):
        info["skipped"] = reason
        save_info()
        _skip_all(spec, {"checkpoint": spec.model_path, "gpu": info["gpu"].get("name")}, reason)
        return 0
    set_phase("importing vLLM")
    import vllm  # noqa: F401  (10-15 s: not part of the engine start)

    set_phase("loading")
    t0, e0 = time.time(), nvml.energy_mj() if nvml is not None and meter else None
    engine = VllmEngine(spec, on_phase=set_phase)
    t1, e1 = time.time(), nvml.energy_mj() if e0 is not None else None
    info["engine_start_s"] = t1 - t0
    start: dict[str, Any] = {"s": t1 - t0, "what": "LLM(...) construction: load, quantize, "
                             "compile, CUDA graphs, KV cache"}
    if e0 is not None and e1 is not None:
        start["j"] = (e1 - e0) / 1e3
        start["j_above_idle"] = start["j"] - idle_w * (t1 - t0) if idle_w is not None else None
        start["energy"] = "NVML counter read before and after (100 ms resolution)"
    info["engine_start"] = start
    info["engine"] = {**engine.info(), **engine.modules()}
    info["versions"] = imported_versions()
    save_info()
    common = {"checkpoint": spec.model_path, "engine": info["engine"],
              "versions": info["versions"], "gpu": info.get("gpu", {}).get("name"),
              "engine_start": start}
    insitu = None
    if spec.profile.get("enabled", True):
        try:
            insitu = InSitu(spec, _sites(spec), info["engine"].get("max_num_batched_tokens"))
        except Exception as e:  # no layer order for this model: energy figures only
            common["in_situ"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if meter:
        meter.start()
    with ModelRecordWriter(Path(spec.run_dir)) as writer:
        def write(rec: dict[str, Any]) -> None:
            if nvml is not None:
                rec["gpu_state"] = nvml.state()  # right after the windows: throttling shows
            writer.write(rec)
            print(f"[dqprof] {rec['key']}: {rec['status']} {rec.get('reason') or ''}",
                  flush=True)

        run_points(engine, spec, meter, idle_w, write, common, insitu=insitu,
                   phase=set_phase)
    if meter:
        meter.stop()
    info["finished"] = time.time()
    set_phase("done", len(spec.points))
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    # vLLM's engine teardown can hang at interpreter exit; everything is on disk by now
    os._exit(code)
