"""Plan and run a sweep: every shape x backend x M, measured and recorded point by point.

Points are grouped by (shape, backend) so a weight is quantized and rotated copies are made
once per group, then every M reuses them. A run folder can be resumed: points whose key is
already recorded (any status) are not redone. Shards (``--shard i/n``, ``bench --gpus``) take
whole shapes, so every backend of a shape, bf16 among them, runs on one board (``shard_groups``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dqprof.errors import DqprofError
from dqprof.kernels import Backend, parse_backends
from dqprof.models.config import load_config
from dqprof.models.shapes import LinearShape, linear_shapes, select_shapes
from dqprof.results import (
    SCHEMA_VERSION,
    RecordWriter,
    board_identity,
    kernels_path,
    load_records,
    point_key,
    read_run,
    rewrite_records,
    write_run,
)

DEFAULT_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
QUICK_M = (1, 16, 256, 2048)
DEFAULT_MODEL = "gemma-4-e4b"
CPU_CACHE_BYTES = 32 << 20  # rotation target on CPU, where no L2 size is read
MAX_COPIES = 2048
# one pass over the rotated calls: the slowest in the H200 profile is 0.15 s (tinygemm-int4,
# M=4096, 543 copies of a PLE projection); a slower GPU may take ~10x that. Timing costs ~20
# passes, so a pass beyond this would hold one point for minutes (e.g. eager launches of a
# path whose graph capture failed)
MAX_REPLAY_S = {"cuda": 5.0, "cpu": 30.0}
# a point that has not finished by then is stuck (a kernel that never returns: seen with
# Machete under the energy window's deep queue of graph replays); the slowest legitimate point
# in the H200 profile takes 8 s. A stuck CUDA context cannot be recovered in-process: the
# point is recorded failed and the process exits, and --resume goes on with the next point
POINT_TIMEOUT_S = {"cuda": 120.0, "cpu": 600.0}
EXIT_STUCK = 4
REL_TOL = 2e-2  # bf16 output of a bf16-input GEMM lands near 4e-3; a wrong kernel lands near 1
log = logging.getLogger(__name__)  # `dqprof bench --verbose`: where a slow point spends its time
SUITE_KEYS = {"model", "shapes", "m", "backends", "repeats", "window_s", "window_min_s",
              "energy_precision", "l2_factor", "hot", "energy", "attribution", "seed",
              "point_timeout_s", "description"}


@dataclass
class SweepConfig:
    model: str = DEFAULT_MODEL
    shapes: str | None = None  # filter: comma-separated names or groups
    m: tuple[int, ...] = DEFAULT_M
    backends: str | None = None  # comma-separated specs; None: every registered backend
    device: str = "cuda"
    hot: bool = False  # one weight copy: the L2-resident case
    repeats: int = 15
    # the energy window stops once J/call is known to energy_precision (relative, one standard
    # deviation), no sooner than window_min_s and 3 counter updates, no later than window_s
    window_s: float = 1.0
    window_min_s: float = 0.3
    energy_precision: float = 0.005
    l2_factor: float = 3.0  # rotated copies hold this many times the L2 size
    energy: bool = True
    attribution: bool = True
    seed: int = 0
    max_replay_s: float | None = None  # None: MAX_REPLAY_S of the device
    point_timeout_s: float | None = None  # None: POINT_TIMEOUT_S of the device
    shard: tuple[int, int] = (1, 1)  # (i, n): this process runs shard i of n (shard_groups)
    suite: dict[str, Any] | None = None  # the suite file's content, recorded in run.json
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["m"] = list(self.m)
        d["shard"] = f"{self.shard[0]}/{self.shard[1]}"
        return d


def load_suite(path: Path, base: SweepConfig) -> SweepConfig:
    """A suite file (TOML) sets the sweep's model, shapes, M, backends and method."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise DqprofError(f"cannot read suite {path}: {e}") from e
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise DqprofError(f"suite {path}: unknown keys {', '.join(sorted(unknown))}")
    cfg = replace(base, suite={"path": str(path), **data})
    for key, value in data.items():
        if key == "m":
            value = tuple(int(v) for v in value)
        elif key in ("shapes", "backends") and isinstance(value, list):
            value = ",".join(value)
        setattr(cfg, key, value)
    return cfg


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise DqprofError(f"--shard takes i/n, e.g. 2/4 (got '{text}')") from None
    if not 1 <= i <= n:
        raise DqprofError(f"--shard {text}: need 1 <= i <= n")
    return i, n


@dataclass
class Group:
    shape: LinearShape
    backend: Backend
    ms: tuple[int, ...]
    variant: str
    keys: list[str] = field(default_factory=list)

    @property
    def cost(self) -> int:
        """Points to measure: in the H200 profile a measured point took 1.0-1.4 s of wall
        whatever its weight's size (1.3 to 105 MB) or M, a skipped one next to nothing."""
        return 0 if self.backend.supports(self.shape) else len(self.ms)


def shard_groups(groups: list[Group], n: int) -> list[list[Group]]:
    """The plan's groups in ``n`` shards, each shape's groups wholly in one, in plan order.

    The gate normalizes a point's energy by bf16's at the same shape and M measured on the same
    board (``gate.boards``), so a shape never spans shards. Shapes are dealt largest cost first
    (ties in plan order) to the shard with the least cost so far (ties: the lowest), so shards
    differ by at most one shape's points. Deterministic: every shard's process, on any machine,
    computes the same split from the same plan. A plan of fewer shapes than ``n`` leaves shards
    empty.
    """
    shapes: dict[str, list[Group]] = {}
    for g in groups:
        shapes.setdefault(g.shape.name, []).append(g)
    load, owner = [0] * n, {}
    for name in sorted(shapes, key=lambda s: -sum(g.cost for g in shapes[s])):
        i = min(range(n), key=lambda j: load[j])
        owner[name] = i
        load[i] += sum(g.cost for g in shapes[name])
    return [[g for g in groups if owner[g.shape.name] == i] for i in range(n)]


def plan(cfg: SweepConfig) -> tuple[str, list[Group]]:
    """(model name, the groups this shard runs), in a deterministic order."""
    model_cfg = load_config(cfg.model)
    shapes = select_shapes(linear_shapes(model_cfg), cfg.shapes)
    backends = parse_backends(cfg.backends)
    if any(m < 1 for m in cfg.m):
        raise DqprofError("M values must be positive")
    if cfg.point_timeout_s is not None and not cfg.point_timeout_s > 0:
        raise DqprofError(f"--point-timeout must be positive seconds (got {cfg.point_timeout_s})")
    _check_window(cfg)
    groups = []
    for shape in shapes:
        for backend in backends:
            ms = (0,) if backend.m_independent else tuple(sorted(set(cfg.m)))
            variant = ",".join(v for v in (backend.variant, "hot" if cfg.hot else "") if v)
            g = Group(shape, backend, ms, variant)
            g.keys = [point_key(model_cfg.name, shape.name, m, backend.name, variant) for m in ms]
            groups.append(g)
    i, n = cfg.shard
    return model_cfg.name, shard_groups(groups, n)[i - 1]


def _check_window(cfg: SweepConfig) -> None:
    if not cfg.window_s > 0:
        raise DqprofError(f"--window (the longest energy window) must be positive seconds "
                          f"(got {cfg.window_s})")
    if not cfg.window_min_s >= 0:  # above --window it is moot: the longest window wins
        raise DqprofError(f"--window-min must be seconds >= 0 (got {cfg.window_min_s})")
    if not 0 < cfg.energy_precision < 1:
        raise DqprofError(f"--energy-precision must be a fraction between 0 and 1, e.g. 0.5% "
                          f"(got {cfg.energy_precision})")


def rel_error(out: Any, expected: Any) -> float:
    import torch

    if isinstance(out, tuple | list):
        out = torch.cat([o.reshape(-1) for o in out])
    out, expected = out.float().reshape(-1), expected.float().reshape(-1).to(out.device)
    if out.numel() != expected.numel():
        return math.inf
    if not torch.isfinite(out).all():
        return math.nan
    return float((out - expected).norm() / expected.norm().clamp(min=1e-30))


class Sweep:
    """One sweep into one run folder."""

    def __init__(self, cfg: SweepConfig, run_dir: Path, resume: bool = False,
                 retry_failed: bool = False,
                 progress: Callable[[int, int, str], None] | None = None):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.retry_failed = retry_failed
        self.progress = progress or (lambda done, total, label: None)
        self.model, self.groups = plan(cfg)
        self.warnings: list[str] = []
        if not self.groups and cfg.shard[1] > 1:
            self.warnings.append(f"shard {cfg.shard[0]}/{cfg.shard[1]} holds no points: shards "
                                 f"take whole shapes and this plan has fewer shapes than "
                                 f"{cfg.shard[1]}")
        self.nvml = None
        self._reader: Any = None  # the energy counter's reader thread, while the sweep runs
        self.idle_power_w: float | None = None
        self.power_limit_w: float | None = None
        self.l2_bytes = CPU_CACHE_BYTES
        self.board: dict[str, Any] | None = None  # {uuid, name}: on every record
        # fail before any work (and before a progress bar) on the errors users make most
        self._check_device()
        if kernels_path(self.run_dir).exists() and not resume:
            raise DqprofError(f"{self.run_dir} already holds results: pass --resume to "
                              f"continue it, or choose another -o")

    # -- setup -----------------------------------------------------------------------
    def _check_device(self) -> None:
        import torch

        if self.cfg.device == "cuda" and not torch.cuda.is_available():
            raise DqprofError("no CUDA GPU here: use --device cpu for a timing-only run, or "
                              "read the committed profile with `dqprof report`", exit_code=3)
        if self.cfg.device not in ("cuda", "cpu"):
            raise DqprofError(f"--device must be cuda or cpu (got '{self.cfg.device}')")

    def _done_keys(self) -> set[str]:
        path = kernels_path(self.run_dir)
        if not path.exists():
            return set()
        records = load_records(path)
        if self.retry_failed:
            records = [r for r in records if r["status"] != "failed"]
            rewrite_records(path, records)
        return {r["key"] for r in records}

    def _setup(self) -> dict[str, Any]:
        from dqprof.measure.environment import environment

        self.run_dir.mkdir(parents=True, exist_ok=True)
        info = read_run(self.run_dir) if self.resume else {}
        env = environment(self.cfg.device)
        session: dict[str, Any] = {"started": _now(), "config": self.cfg.as_dict(),
                                   "environment": env}
        if self.cfg.device == "cuda":
            self._setup_gpu(env, session)
        self.board = board_identity(env)
        info.setdefault("schema", SCHEMA_VERSION)
        info.setdefault("kind", "kernels")
        info.setdefault("model", self.model)
        info.setdefault("created", session["started"])
        # the first session's environment and ceilings describe the run; each session is kept
        for key in ("environment", "ceilings", "idle_power_w", "config"):
            if key in session and key not in info:
                info[key] = session[key]
        info.setdefault("sessions", []).append(session)
        write_run(self.run_dir, info)
        return info

    def _setup_gpu(self, env: dict[str, Any], session: dict[str, Any]) -> None:
        from dqprof.measure.ceilings import measure_ceilings
        from dqprof.measure.energy import measure_idle
        from dqprof.measure.nvml import open_nvml

        self.l2_bytes = env["gpu"]["l2_bytes"] or 50 << 20
        nvml, why = open_nvml(0)
        if nvml is not None:
            env["gpu"].update(nvml.static_info())
            self.power_limit_w = env["gpu"].get("power_limit_w")
        if self.cfg.energy and (nvml is None or not nvml.energy_supported):
            why = why or "this GPU's NVML has no total-energy counter"
            self.warnings.append(f"energy not measured: {why}; records are time-only")
        self.nvml = nvml
        if self.cfg.energy and nvml is not None and nvml.energy_supported:
            self._energy_reader()  # reading from now on: the first window finds a history
            self.idle_power_w = measure_idle(nvml)
            session["idle_power_w"] = self.idle_power_w
        session["ceilings"] = measure_ceilings()
        session["gpu_state_start"] = nvml.state() if nvml else None

    def _energy_reader(self) -> Any:
        """The counter's reader thread, one for the whole sweep: its history bounds the
        counter's period for every window (dqprof/measure/window.py)."""
        if self._reader is None:
            from dqprof.measure.energy import TickReader

            self._reader = TickReader(self.nvml.energy_mj).start()
        return self._reader

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        done = self._done_keys()
        info = self._setup()
        ceilings = info.get("ceilings") or {}
        total = sum(len(g.keys) for g in self.groups)
        counts = {"ok": 0, "skipped": 0, "failed": 0, "resumed": 0}
        t_start = time.perf_counter()
        work = [(g, [(m, key) for m, key in zip(g.ms, g.keys, strict=True) if key not in done])
                for g in self.groups]
        counts["resumed"] = finished = sum(len(g.ms) - len(todo) for g, todo in work)
        work = [(g, todo) for g, todo in work if todo]
        with RecordWriter(self.run_dir) as writer, _Weights(self.cfg.seed) as self._weights:
            self._writer = writer
            later = [g for g, _ in work if not self._skip_reason(g)]
            for g, todo in work:
                # the next shape's weight is made on the CPU while this group is measured
                if not self._skip_reason(g):
                    later.pop(0)
                    self._weights.prefetch(later[0].shape if later else None, keep=g.shape)
                for rec in self._run_group(g, todo, ceilings):
                    writer.write(rec)
                    counts[rec["status"]] += 1
                    finished += 1
                    self.progress(finished, total, f"{g.shape.name} {rec['backend']} m={rec['m']}")
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        info = read_run(self.run_dir)
        info["sessions"][-1].update(finished=_now(), wall_s=time.perf_counter() - t_start,
                                    counts=counts, warnings=self.warnings)
        write_run(self.run_dir, info)
        return counts

    def _base(self, g: Group, m: int, key: str) -> dict[str, Any]:
        s = g.shape
        return {"schema": SCHEMA_VERSION, "kind": "kernel", "key": key, "model": self.model,
                "layer": s.name, "group": s.group, "n": s.n, "k": s.k, "shards": list(s.shards),
                "calls_per_token": s.calls_per_token, "per_sequence": s.per_sequence,
                "m": m, "backend": g.backend.name, "variant": g.variant, "dtype": "bfloat16",
                "device": self.cfg.device, "board": self.board, "time_utc": _now()}

    def _run_group(self, g: Group, todo: list[tuple[int, str]], ceilings: dict[str, float]):
        import torch

        if reason := self._skip_reason(g):
            for m, key in todo:
                yield {**self._base(g, m, key), "status": "skipped", "reason": reason}
            return
        dev = self.cfg.device
        log.debug("%s %s: quantizing", g.shape.name, g.backend.name)
        t_prepare = time.perf_counter()
        try:
            weight = self._weights.get(g.shape).to(dev, torch.bfloat16)
            states = [g.backend.prepare(weight, g.shape)]
            del weight
            copies = self._copies(g)
            states += [g.backend.clone(states[0]) for _ in range(copies - 1)]
            log.debug("%s %s: %d rotated copies ready", g.shape.name, g.backend.name, copies)
        except Exception as e:  # quantize/pack failed: every point of the group fails
            for m, key in todo:
                yield {**self._base(g, m, key), "status": "failed", "reason": _err(e)}
            self._free()
            return
        if dev == "cuda":
            torch.cuda.synchronize()
        # the group's quantize + copies, once per group: kept in its first point's wall_s
        prepare_s: float | None = time.perf_counter() - t_prepare
        for m, key in todo:
            base = self._base(g, m, key)
            with self._watchdog(base):
                try:
                    rec = {**base, **self._measure(g, states, m, ceilings)}
                except Exception as e:  # one bad point does not stop the sweep
                    rec = {**base, "status": "failed", "reason": _err(e)}
            if prepare_s is not None and rec["status"] == "ok":
                rec["wall_s"] = {"prepare": prepare_s, **rec.get("wall_s", {})}
                prepare_s = None
            yield rec
        del states
        self._free()

    def _skip_reason(self, g: Group) -> str | None:
        return g.backend.unavailable(self.cfg.device) or g.backend.supports(g.shape)

    @contextlib.contextmanager
    def _watchdog(self, base: dict[str, Any]):
        limit = self.cfg.point_timeout_s or POINT_TIMEOUT_S.get(self.cfg.device,
                                                                POINT_TIMEOUT_S["cpu"])

        def stuck() -> None:  # on the timer's thread, while the main one waits on the device
            reason = (f"point did not finish in {limit:.0f} s (a kernel that never returns?); "
                      f"the process exited: `--resume` goes on with the next point")
            self._writer.write({**base, "status": "failed", "reason": reason})
            print(f"error: {base['key']}: {reason}", file=sys.stderr, flush=True)
            os._exit(EXIT_STUCK)

        timer = threading.Timer(limit, stuck)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _copies(self, g: Group) -> int:
        if self.cfg.hot:
            return 1
        target = self.cfg.l2_factor * self.l2_bytes
        return int(min(MAX_COPIES, max(1, math.ceil(target / g.backend.resident_bytes(g.shape)))))

    def _free(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.cfg.device == "cuda":
            torch.cuda.empty_cache()

    def _measure(self, g: Group, states: list, m: int, ceilings: dict[str, float]
                 ) -> dict[str, Any]:
        import torch

        from dqprof.measure.timing import Replay, replay_seconds, time_replay

        dev, backend, shape = self.cfg.device, g.backend, g.shape
        rows = max(m, 1)
        # where a point's wall time goes (the sweep's own overhead)
        clock = _PhaseClock(f"{shape.name} {backend.name} m={m}")
        # correctness first, on fresh inputs; a wrong path is recorded failed and never timed
        x_check = torch.randn(rows, shape.k, device=dev, dtype=torch.bfloat16)
        err = rel_error(backend(states[0], x_check), backend.expected(states[0], x_check))
        if not err <= REL_TOL:  # NaN fails too
            return {"status": "failed", "rel_err": err if math.isfinite(err) else None,
                    "reason": f"output differs from the fp32 reference: rel err {err:.3g} > "
                              f"{REL_TOL}"}
        clock.lap("check")
        x = torch.randn(rows, shape.k, device=dev, dtype=torch.bfloat16)
        fns = [lambda s=s: backend(s, x) for s in states]
        replay = Replay(fns, dev)
        clock.lap("capture")
        kernels = None
        if dev == "cuda" and self.cfg.attribution:
            from dqprof.measure.attribution import attribute

            kernels = attribute(fns[: min(4, len(fns))])
        clock.lap("attribution")
        limit = self.cfg.max_replay_s or MAX_REPLAY_S.get(dev, MAX_REPLAY_S["cpu"])
        if (one := replay_seconds(replay)) > limit:
            how = ("CUDA graph" if replay.graph else
                   f"eager launches ({replay.graph_error or 'no graph'})")
            return {"status": "failed", "reason": f"one pass over the {replay.calls} rotated "
                    f"calls took {one:.2f} s (limit {limit} s), {how}: not timed"}
        # timing right before the energy window: its busy GPU is the window's warm-up; the
        # two passes just timed warmed the graph and size the samples (nothing measured twice)
        t = time_replay(replay, self.cfg.repeats, warmup=0, pass_s=one)
        clock.lap("timing")
        energy, state = None, None
        if self.nvml is not None:
            if self.cfg.energy and self.nvml.energy_supported:
                from dqprof.measure.energy import measure_energy

                # batches are sized by the slower of the event-timed call and the host's view
                # of a pass: event times that miss work must not queue hours of it
                energy = measure_energy(
                    replay, self.nvml, max(t.median_s, one / replay.calls), self.cfg.window_s,
                    self.idle_power_w, self.power_limit_w, window_min_s=self.cfg.window_min_s,
                    reader=self._energy_reader(),
                    precision=self.cfg.energy_precision).as_dict()
            state = self.nvml.state()  # right after the busy window: throttling shows here
        clock.lap("energy")
        traffic = backend.traffic(shape, m, kernels)
        flops = backend.flops(shape, m)
        bw, fl = traffic.total / t.median_s, flops / t.median_s
        timing = "cpu" if dev == "cpu" else ("cuda-graph" if replay.graph else "eager")
        graph_error = replay.graph_error
        del replay, fns
        return {
            "status": "ok", "reason": None, "rel_err": err,
            "method": {"timing": timing, "graph_error": graph_error,
                       "rotation": len(states),
                       "host_pass_s": one,  # one pass over the rotation, host wall + sync
                       "rotation_bytes": len(states) * backend.resident_bytes(shape),
                       "l2_bytes": self.l2_bytes if dev == "cuda" else None,
                       "hot": self.cfg.hot, "repeats": self.cfg.repeats,
                       # the longest window, the shortest, the precision it stops at
                       "window_s": self.cfg.window_s if energy else None,
                       "window_min_s": self.cfg.window_min_s if energy else None,
                       "energy_precision": self.cfg.energy_precision if energy else None},
            "time": t.as_dict(), "energy": energy, "kernels": kernels,
            "config": backend.launch_config(states[0], rows),
            "traffic": traffic.as_dict(), "flops": flops,
            "intensity": flops / traffic.total if traffic.total else None,
            "achieved": {"bytes_per_s": bw, "flop_per_s": fl,
                         "frac_bandwidth": bw / ceilings["copy_bytes_per_s"]
                         if ceilings.get("copy_bytes_per_s") else None,
                         "frac_flops": fl / ceilings["bf16_flop_per_s"]
                         if ceilings.get("bf16_flop_per_s") else None},
            "gpu_state": state,
            "wall_s": clock.laps,
        }


class _Weights:
    """Each shape's random weight (fp32, CPU), made once per shape and seed.

    Groups run shape by shape, so most groups reuse the weight of the one before; the next
    shape's weight is made in a thread while the current group is measured. The thread only
    runs torch.randn on the CPU (the GPU copy is made on the main thread), so it cannot put
    work on the GPU inside an energy window.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dqprof-weights")
        self._made: dict[tuple[int, int], Future] = {}

    def _make(self, n: int, k: int) -> Any:
        import torch

        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        return torch.randn(n, k, generator=gen) * 0.02

    def _submit(self, shape: LinearShape) -> Future:
        key = (shape.n, shape.k)
        if key not in self._made:
            self._made[key] = self._pool.submit(self._make, *key)
        return self._made[key]

    def prefetch(self, shape: LinearShape | None, keep: LinearShape) -> None:
        """Hold ``keep``'s weight (first in line) and start ``shape``'s; drop the rest."""
        wanted = {(s.n, s.k) for s in (shape, keep) if s is not None}
        for key in set(self._made) - wanted:
            del self._made[key]
        self._submit(keep)
        if shape is not None:
            self._submit(shape)

    def get(self, shape: LinearShape) -> Any:
        return self._submit(shape).result()

    def __enter__(self) -> _Weights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._made.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _PhaseClock:
    """Host seconds spent in each phase of a point, in order."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._t
        self._t = now
        log.debug("%s: %s done in %.3f s", self.label, name, self.laps[name])


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
