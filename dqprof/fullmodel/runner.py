"""Run a checkpoint under each quantization in vLLM: one worker process per quantization.

Before any engine starts, every checkpoint is checked against its config (``preflight``) and
against the quantization asked of it. Each worker gets an even share of the time budget
still left (and a hard timeout); a crash, an OOM or a timeout becomes a failed record for
each point the worker did not record, and the next quantization runs. run.json holds the
run's configuration and host environment per session and, per worker of a session, its GPU,
idle power, vLLM engine settings (attention backend included), versions, exit status, log.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dqprof.errors import DqprofError
from dqprof.fullmodel.preflight import CheckpointInfo, verify_checkpoint
from dqprof.fullmodel.records import (
    ModelRecordWriter,
    base_record,
    load_model_records,
    model_path,
    record_key,
)
from dqprof.fullmodel.worker import ENGINE_MODES, WorkerSpec
from dqprof.fullmodel.workload import (
    Point,
    WindowRule,
    Workload,
    budget_share,
    engine_limits,
    plan,
)
from dqprof.results import SCHEMA_VERSION, read_run, write_run

# quantization name -> (vLLM's quantization argument, checkpoint format it runs on)
QUANTS: dict[str, tuple[str | None, str]] = {
    "bf16": (None, "bf16"),
    "bitsandbytes": ("bitsandbytes", "bf16"),  # NF4, quantized by vLLM at load
    "gptq_marlin": ("gptq_marlin", "gptq"),
    "awq_marlin": ("awq_marlin", "awq"),
    # NF4 quantized at load like bitsandbytes, run by triton-nf4 (dqprof.fullmodel.plugin)
    "dqprof_nf4": ("dqprof_nf4", "bf16"),
    "fp8": ("fp8", "bf16"),  # per-tensor weights quantized at load, dynamic activations
}
POLL_S = 1.0  # how often the runner looks at a worker's phase
MIN_WORKER_S = 60.0  # below this a worker cannot even start an engine
KILL_GRACE_S = 60.0  # past its share, a worker finishing a point is given this long
# the backslash keeps rich (dqprof.cli.main prints errors as markup) from eating "[vllm]"
VLLM_HINT = 'vLLM is not installed here: pip install -e ".[vllm]"'


@dataclass
class RunConfig:
    quants: list[tuple[str, Path]]  # (quantization, checkpoint folder)
    workloads: list[Workload]
    batches: tuple[int, ...]
    out: Path
    rule: WindowRule = field(default_factory=WindowRule)
    warmup_calls: int = 1
    seed: int = 0
    engine_mode: str = "default"
    gpu_memory_utilization: float = 0.85
    budget_s: float | None = None  # whole run, all quantizations
    timeout_s: float = 1800.0  # per worker
    energy: bool = True
    worker_cmd: list[str] | None = None  # None: this Python, -m dqprof.fullmodel.worker
    profile: dict[str, Any] = field(default_factory=dict)  # stepprof.ProfileOptions fields

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quants"] = [[q, str(p)] for q, p in self.quants]
        d["out"] = str(self.out)
        return d


def parse_quants(text: str, model: Path | None) -> list[tuple[str, Path]]:
    """'bf16,bitsandbytes,gptq_marlin@ckpt/g4-gptq': a checkpoint per name, --model default."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, path = item.partition("@")
        if name not in QUANTS:
            raise DqprofError(f"unknown quantization '{name}' (known: {', '.join(QUANTS)})")
        if not path and model is None:
            raise DqprofError(f"no checkpoint for '{name}': pass --model or {name}@PATH")
        out.append((name, Path(path) if path else model))
    if not out:
        raise DqprofError("no quantization given (--quant)")
    return out


def check_quant(quant: str, info: CheckpointInfo) -> None:
    need = QUANTS[quant][1]
    if info.format != need:
        has = "bf16 (no quantization_config)" if info.format == "bf16" else info.format.upper()
        raise DqprofError(f"--quant {quant} runs on a {need} checkpoint; {info.path} is {has}")


def _read_info(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet
        return {}


class PhaseDisplay:
    """One progress line per phase of a worker (loading, quantizing, compiling, warming up,
    measuring, profiling), with an ETA for the quantization once a point has finished."""

    def __init__(self, quant: str, points: int, emit: Callable[[str], None],
                 engine_start_s: float | None = None):
        self.quant, self.points, self.emit = quant, points, emit
        self.engine_start_s = engine_start_s
        self.last: str | None = None
        self.measuring_since: float | None = None

    def eta_s(self, info: dict[str, Any], elapsed_s: float) -> float | None:
        done = info.get("points_done") or 0
        phase = str(info.get("phase", ""))
        if phase.startswith(("measuring", "profiling")):
            if self.measuring_since is None:
                self.measuring_since = elapsed_s
            if done:
                per = (elapsed_s - self.measuring_since) / done
                return per * (self.points - done)
            return None
        if self.engine_start_s is not None and phase not in ("done", ""):
            return max(0.0, self.engine_start_s - elapsed_s)  # until the engine is up
        return None

    def update(self, info: dict[str, Any], elapsed_s: float) -> None:
        phase = info.get("phase")
        if not phase or phase == self.last:
            return
        self.last = phase
        eta = self.eta_s(info, elapsed_s)
        self.emit(f"{self.quant}: {phase} ({elapsed_s:.0f} s in"
                  + (f", ETA {eta / 60:.1f} min" if eta is not None else "") + ")")


def failure_reason(log_tail: str, rc: int | None, timed_out: bool, timeout_s: float) -> str:
    """One line for the records of points a worker did not finish."""
    if timed_out:
        return f"worker timed out after {timeout_s:.0f} s"
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    if any("out of memory" in ln.lower() or "OutOfMemoryError" in ln for ln in lines):
        return f"worker ran out of GPU memory (exit {rc})"
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln.lower()]
    last = (errors or lines or ["no output"])[-1]
    if rc == 0:
        return f"worker ended without recording this point ({last[:300]})"
    return f"worker exited with code {rc}: {last[:300]}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _host_environment() -> dict[str, Any]:
    # no torch.cuda here: a CUDA context in the parent would hold GPU memory all run long
    from dqprof.measure.environment import git_commit, versions

    return {"python": platform.python_version(), "platform": platform.platform(),
            "host": platform.node(), "versions": versions(), "git": git_commit()}


class Runner:
    def __init__(self, cfg: RunConfig, progress: Callable[[str], None] | None = None):
        if cfg.engine_mode not in ENGINE_MODES:
            raise DqprofError(f"--engine {cfg.engine_mode}: choose {', '.join(ENGINE_MODES)}")
        self.cfg, self.progress = cfg, progress or (lambda msg: None)
        self.points = plan(cfg.workloads, cfg.batches)
        self.engine_start_s: float | None = None  # the last worker's, for the ETA
        self.infos: dict[Path, CheckpointInfo] = {}
        for quant, path in cfg.quants:  # every check before any engine starts
            if path not in self.infos:
                self.infos[path] = verify_checkpoint(path)
            check_quant(quant, self.infos[path])

    def run(self) -> dict[str, int]:
        cfg = self.cfg
        if cfg.worker_cmd is None and importlib.util.find_spec("vllm") is None:
            raise DqprofError(VLLM_HINT, exit_code=3)
        if cfg.worker_cmd is None and any(q == "dqprof_nf4" for q, _ in cfg.quants):
            from dqprof.fullmodel.plugin import check_triton

            check_triton()
        start = time.time()
        out = Path(cfg.out)
        info = read_run(out) or {"schema": SCHEMA_VERSION, "kind": "model", "created": _now()}
        if info.get("kind") != "model":
            raise DqprofError(f"{out} holds a '{info.get('kind')}' run: give model runs their "
                              f"own folder (-o)")
        (out / "logs").mkdir(parents=True, exist_ok=True)
        before = load_model_records(out) if model_path(out).exists() else []
        done = {r["key"] for r in before if r["status"] == "ok"}  # a rerun resumes
        info.setdefault("sessions", []).append(
            {"started": _now(), "config": cfg.as_dict(), "environment": _host_environment(),
             "checkpoints": {str(p): {"name": i.name, "format": i.format,
                                      "quantized_linears": i.quantized,
                                      "unquantized_linears": i.unquantized_linears,
                                      "warnings": i.warnings} for p, i in self.infos.items()},
             "workers": {}})
        write_run(out, info)
        counts = {"ok": 0, "skipped": 0, "failed": 0, "already": 0}
        for i, (quant, path) in enumerate(cfg.quants):
            ck = self.infos[path]
            todo = [p for p in self.points
                    if record_key(ck.name, quant, p.workload.name, p.batch) not in done]
            counts["already"] += len(self.points) - len(todo)
            if not todo:
                continue
            left = cfg.budget_s - (time.time() - start) if cfg.budget_s else None
            share = budget_share(left, len(cfg.quants) - i) if left is not None else None
            if left is not None and left < MIN_WORKER_S:
                self._fill(out, ck, quant, todo, "skipped",
                           f"time budget spent before {quant} started ({left:.0f} s left)")
                continue
            self.progress(f"{quant}: {len(todo)} points on {path}"
                          + (f", {share:.0f} s budget" if share else ""))
            worker = self._run_worker(out, quant, ck, todo, share, left)
            info = read_run(out)
            info["sessions"][-1]["workers"][quant] = worker
            write_run(out, info)
        for r in load_model_records(out)[len(before):]:
            counts[r["status"]] += 1
        info = read_run(out)
        info["sessions"][-1].update(finished=_now(), wall_s=time.time() - start, counts=counts)
        write_run(out, info)
        return counts

    def _spec(self, out: Path, quant: str, ck: CheckpointInfo, todo: list[Point],
              deadline: float | None) -> WorkerSpec:
        limits = engine_limits(self.points)  # one engine shape for the whole matrix
        return WorkerSpec(
            run_dir=str(out), model_path=ck.path, model_name=ck.name, quant=quant,
            vllm_quantization=QUANTS[quant][0], vocab=int(ck.fields["vocab_size"]),
            points=[{"workload": p.workload.name, "input_len": p.workload.input_len,
                     "output_len": p.workload.output_len, "batch": p.batch} for p in todo],
            window=asdict(self.cfg.rule), warmup_calls=self.cfg.warmup_calls, seed=self.cfg.seed,
            engine={**limits, "mode": self.cfg.engine_mode,
                    "gpu_memory_utilization": self.cfg.gpu_memory_utilization},
            deadline=deadline, energy=self.cfg.energy,
            info_path=str(out / "logs" / f"{quant}.info.json"), profile=dict(self.cfg.profile))

    def _run_worker(self, out: Path, quant: str, ck: CheckpointInfo, todo: list[Point],
                    share: float | None, left: float | None) -> dict[str, Any]:
        cfg = self.cfg
        deadline = time.time() + share if share else None
        timeout = cfg.timeout_s
        if share is not None and left is not None:
            timeout = min(timeout, share + KILL_GRACE_S, left)
        spec = self._spec(out, quant, ck, todo, deadline)
        spec_path = out / "logs" / f"{quant}.spec.json"
        spec.save(spec_path)
        log_path = out / "logs" / f"{quant}.log"
        cmd = (cfg.worker_cmd or [sys.executable, "-m", "dqprof.fullmodel.worker"]) + [
            str(spec_path)]
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONUNBUFFERED": "1"}
        t0 = time.time()
        timed_out, rc = False, None
        with log_path.open("w") as log:
            # own session: on timeout the whole group (compile workers too) is killed
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            display = PhaseDisplay(quant, len(todo), self.progress, self.engine_start_s)
            while True:
                try:
                    rc = proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if time.time() - t0 > timeout:
                        timed_out = True
                        os.killpg(proc.pid, signal.SIGKILL)
                        rc = proc.wait()
                        break
                    display.update(_read_info(Path(spec.info_path)), time.time() - t0)
        recorded = {r["key"] for r in load_model_records(out)} if model_path(out).exists() \
            else set()
        missing = [p for p in todo
                   if record_key(ck.name, quant, p.workload.name, p.batch) not in recorded]
        reason = None
        if missing:
            tail = log_path.read_text(errors="replace")[-20000:]
            reason = failure_reason(tail, rc, timed_out, timeout)
            self._fill(out, ck, quant, missing, "failed", reason)
        self.progress(f"{quant}: exit {rc}{' (timeout)' if timed_out else ''}, "
                      f"{len(todo) - len(missing)}/{len(todo)} points recorded")
        winfo: dict[str, Any] = {"rc": rc, "timed_out": timed_out, "timeout_s": timeout,
                                 "wall_s": time.time() - t0, "log": str(log_path),
                                 "failure": reason}
        winfo.update(_read_info(Path(spec.info_path)))
        if winfo.get("engine_start_s"):
            self.engine_start_s = winfo["engine_start_s"]
        return winfo

    def _fill(self, out: Path, ck: CheckpointInfo, quant: str, points: list[Point],
              status: str, reason: str) -> None:
        with ModelRecordWriter(out) as w:
            for p in points:
                w.write({**base_record(ck.name, quant, p.workload.name, p.workload.input_len,
                                       p.workload.output_len, p.batch),
                         "checkpoint": ck.path, "status": status, "reason": reason})
