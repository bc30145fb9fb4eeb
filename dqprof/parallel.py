"""``dqprof bench --gpus``: one worker process per GPU on the shards of one plan, one run folder.

Each worker is a plain sweep (``Sweep``) of shard i/n, pinned to one GPU by
``CUDA_VISIBLE_DEVICES=<its UUID>`` (a UUID, not an index: CUDA's and NVML's numbering can
differ), writing its own folder ``OUT/shards/s<session>/<i>of<n>-gpu<index>/``. The parent
follows the workers by counting the records they append (each one fsynced as its point ends),
and when all have ended joins every shard folder into ``OUT/kernels.jsonl`` and ``OUT/run.json``
(each board's name, UUID, idle power and ceilings kept under ``boards``; each record names its
board). A worker that dies loses only its point in flight: its shard is recorded incomplete, the
others finish, the exit code is non-zero, and ``--resume`` (on any number of GPUs) measures only
what no shard folder holds yet. A shard takes whole shapes (``sweep.shard_groups``), so a plan
of fewer shapes than GPUs runs on as many GPUs as it has shapes. Resumed on another number of
GPUs, a shape begun on one board may be finished on another; the gate then says that its
points' bf16 ran on another board. ``DQPROF_FAKE_GPUS="uuid=name,..."`` stands in for the host's
GPUs, so the runner is tested on CPU with ``--device cpu`` workers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqprof.errors import DqprofError
from dqprof.results import (
    kernels_path,
    load_records,
    normal_uuid,
    read_run,
    rewrite_records,
    write_atomic,
    write_run,
)

FAKE_ENV = "DQPROF_FAKE_GPUS"
SHARDS = "shards"
WORKER_FILE = "worker.json"
LOG_FILE = "worker.log"
POLL_S = 1.0


@dataclass(frozen=True)
class Gpu:
    index: int  # as CUDA numbers the GPUs this process sees
    uuid: str
    name: str


def visible_gpus() -> list[Gpu]:
    """The GPUs this process can see (CUDA_VISIBLE_DEVICES applies), or the fake ones."""
    fake = os.environ.get(FAKE_ENV)
    if fake is not None:
        pairs = [p.partition("=") for p in fake.split(",") if p.strip()]
        return [Gpu(i, u.strip(), n.strip() or "fake GPU") for i, (u, _, n) in enumerate(pairs)]
    import torch

    if not torch.cuda.is_available():
        raise DqprofError("no CUDA GPU here: --gpus spreads a sweep over GPUs (use --device cpu "
                          "without --gpus for a timing-only run)", exit_code=3)
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(Gpu(i, normal_uuid(str(getattr(p, "uuid", ""))) or str(i), p.name))
    return out


def select_gpus(spec: str, gpus: list[Gpu]) -> list[Gpu]:
    """``all`` or comma-separated indices (as CUDA numbers the visible GPUs)."""
    if spec.strip() == "all":
        chosen = list(gpus)
    else:
        try:
            wanted = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise DqprofError(f"--gpus takes 'all' or GPU indices like 0,2 (got '{spec}')") \
                from None
        if len(set(wanted)) != len(wanted):
            raise DqprofError(f"--gpus {spec}: a GPU named twice")
        shown = ", ".join(str(g.index) for g in gpus) or "none"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hidden = f" (CUDA_VISIBLE_DEVICES={visible!r} hides the rest)" if visible is not None \
            else ""
        lacking = [i for i in wanted if not 0 <= i < len(gpus)]
        if lacking:
            raise DqprofError(f"--gpus {spec}: no GPU {', '.join(map(str, lacking))} here; "
                              f"this process sees {len(gpus)} GPU(s): {shown}{hidden}")
        chosen = [gpus[i] for i in wanted]
    if not chosen:
        raise DqprofError("--gpus: no GPU to run on")
    names = sorted({g.name for g in chosen})
    if len(names) > 1:
        raise DqprofError(f"--gpus picks GPUs of different models ({', '.join(names)}): a "
                          f"sweep's figures belong to one model; run each model separately")
    return chosen


# -- the config a worker runs ------------------------------------------------------------

def config_to_json(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["m"], d["shard"] = list(cfg.m), list(cfg.shard)
    return d


def config_from_json(d: dict[str, Any]) -> Any:
    from dqprof.sweep import SweepConfig

    return SweepConfig(**{**d, "m": tuple(d["m"]), "shard": tuple(d["shard"])})


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run.json config less what may differ between sessions of one sweep."""
    cfg = {k: v for k, v in config.items() if k != "shard"}
    if isinstance(cfg.get("suite"), dict):
        cfg["suite"] = {k: v for k, v in cfg["suite"].items() if k != "path"}
    return cfg


# -- workers -----------------------------------------------------------------------------

@dataclass
class Worker:
    gpu: Gpu
    shard: tuple[int, int]
    folder: Path
    keys: list[str]  # the points of its shard, in plan order
    proc: subprocess.Popen | None = None
    seeded: int = 0  # points already recorded when it started
    done: int = 0
    exit_code: int | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.folder / LOG_FILE

    @property
    def label(self) -> str:
        return f"GPU {self.gpu.index} shard {self.shard[0]}/{self.shard[1]}"

    def count(self) -> int:
        """Points recorded in its folder: its records are appended and fsynced one a line."""
        try:
            data = kernels_path(self.folder).read_bytes()
        except FileNotFoundError:
            return 0
        self.done = data.count(b"\n")
        return self.done


def default_command(folder: Path) -> list[str]:
    return [sys.executable, "-m", "dqprof.parallel", str(folder)]


def eta_s(workers: list[Worker], elapsed_s: float) -> float | None:
    """Seconds until the last worker ends, from each one's own pace this session; None until
    every unfinished worker has measured a point."""
    left = []
    for w in workers:
        remaining = len(w.keys) - w.done
        if remaining <= 0 or w.exit_code is not None:
            continue
        new = w.done - w.seeded
        if new <= 0:
            return None
        left.append(remaining * elapsed_s / new)
    return max(left, default=0.0)


def fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    hours = f"{s // 3600}:{s // 60 % 60:02d}" if s >= 3600 else f"{s // 60}"
    return f"{hours}:{s % 60:02d}"


def progress_line(workers: list[Worker], elapsed_s: float) -> str:
    done = sum(w.done for w in workers)
    total = sum(len(w.keys) for w in workers)
    per = ", ".join(f"gpu{w.gpu.index} {w.done}/{len(w.keys)}"
                    + ("" if w.exit_code in (None, 0) else f" (exit {w.exit_code})")
                    for w in workers)
    return (f"{done}/{total} points on {len(workers)} GPU(s) [{per}], elapsed "
            f"{fmt_s(elapsed_s)}, ETA {fmt_s(eta_s(workers, elapsed_s))}")


# -- the run folder ----------------------------------------------------------------------

def shard_folders(run_dir: Path) -> list[Path]:
    """Every session's shard folders, oldest session first."""
    root = Path(run_dir) / SHARDS
    if not root.is_dir():
        return []
    sessions = sorted((p for p in root.iterdir() if p.is_dir() and p.name[1:].isdigit()),
                      key=lambda p: int(p.name[1:]))
    return [f for s in sessions for f in sorted(s.iterdir()) if kernels_path(f).exists()]


def gather(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every record the folder holds: the merged file, then each shard folder in session order
    (a later session's record of a key wins: --retry-failed measured it again)."""
    records: dict[str, dict[str, Any]] = {}
    for path in [Path(run_dir), *shard_folders(run_dir)]:
        if kernels_path(path).exists():
            for rec in load_records(kernels_path(path)):
                records[rec["key"]] = rec
    return records


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Runner:
    def __init__(self, cfg: Any, run_dir: Path, spec: str, resume: bool = False,
                 retry_failed: bool = False, command: Callable[[Path], list[str]] | None = None,
                 show: Callable[[str], None] | None = None):
        from dqprof.sweep import plan

        if cfg.shard != (1, 1):
            raise DqprofError("--gpus runs every shard of the plan itself: drop --shard")
        if cfg.device != "cuda" and FAKE_ENV not in os.environ:
            raise DqprofError("--gpus spreads a sweep over GPUs: it needs --device cuda")
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.retry_failed = retry_failed
        self.command = command or default_command
        self.show = show or (lambda line: None)
        self.model, groups = plan(cfg)  # plan errors before anything starts
        self.gpus = select_gpus(spec, visible_gpus())
        self.notes: list[str] = []
        shapes = len({g.shape.name for g in groups})
        if 0 < shapes < len(self.gpus):  # a shard takes whole shapes: the rest would idle
            self.notes.append(f"the plan has {shapes} shape(s) and every backend of a shape "
                              f"runs on one GPU: {shapes} of the {len(self.gpus)} GPUs used")
            self.gpus = self.gpus[:shapes]
        held = kernels_path(self.run_dir).exists() or bool(shard_folders(self.run_dir))
        if held and not resume:
            raise DqprofError(f"{self.run_dir} already holds results: pass --resume to "
                              f"continue it, or choose another -o")
        self.previous = read_run(self.run_dir) if resume else {}
        if self.previous.get("config"):
            old, new = comparable(self.previous["config"]), comparable(cfg.as_dict())
            diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            if diff:
                raise DqprofError(f"--resume {self.run_dir}: this sweep differs from the one "
                                  f"recorded there in {', '.join(diff)}")
        n = len(self.gpus)
        session = len([p for p in (self.run_dir / SHARDS).glob("s*") if p.is_dir()]) + 1
        self.session_dir = self.run_dir / SHARDS / f"s{session}"
        self.workers = []
        for i, gpu in enumerate(self.gpus, start=1):
            shard_cfg = dataclasses.replace(cfg, shard=(i, n))
            keys = [k for g in plan(shard_cfg)[1] for k in g.keys]
            folder = self.session_dir / f"{i}of{n}-gpu{gpu.index}"
            self.workers.append(Worker(gpu, (i, n), folder, keys))

    def _start(self, w: Worker, known: dict[str, dict[str, Any]]) -> None:
        w.folder.mkdir(parents=True, exist_ok=True)
        seed = [known[k] for k in w.keys if k in known]
        rewrite_records(kernels_path(w.folder), seed)
        w.done = len(seed)
        # --retry-failed: the worker drops its failed records first, then measures them again
        w.seeded = sum(1 for r in seed if not (self.retry_failed and r["status"] == "failed"))
        shard_cfg = dataclasses.replace(self.cfg, shard=w.shard)
        write_atomic(w.folder / WORKER_FILE, json.dumps(
            {"config": config_to_json(shard_cfg), "retry_failed": self.retry_failed,
             "gpu": dataclasses.asdict(w.gpu)}, indent=1) + "\n")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": w.gpu.uuid, "PYTHONUNBUFFERED": "1"}
        with w.log.open("ab") as log:
            w.proc = subprocess.Popen(self.command(w.folder), env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def run(self) -> int:
        """Run every worker to its end, write the merged folder; the exit code."""
        known = gather(self.run_dir) if self.resume else {}
        started, t0 = _now(), time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        last_shown = ""
        try:
            for w in self.workers:
                self._start(w, known)
            while any(w.exit_code is None for w in self.workers):
                time.sleep(POLL_S)
                for w in self.workers:
                    w.count()
                    if w.exit_code is None and w.proc is not None:
                        w.exit_code = w.proc.poll()
                line = progress_line(self.workers, time.monotonic() - t0)
                if line != last_shown:
                    self.show(line)
                    last_shown = line
        finally:
            for w in self.workers:  # interrupted: stop the workers, keep what they recorded
                if w.proc is not None and w.proc.poll() is None:
                    w.proc.terminate()
                    w.proc.wait()
                    w.exit_code = w.proc.returncode
                w.count()
            self.write_merged(started, time.monotonic() - t0)
        return self.exit_code()

    def exit_code(self) -> int:
        for w in self.workers:
            if w.exit_code:
                return w.exit_code if 0 < w.exit_code < 128 else 1
        return 0 if all(w.done >= len(w.keys) for w in self.workers) else 1

    def problems(self) -> list[str]:
        out = []
        for w in self.workers:
            if w.exit_code or w.done < len(w.keys):
                out.append(f"{w.label} ({w.gpu.uuid}) exited {w.exit_code}: {w.done} of "
                           f"{len(w.keys)} points recorded, the shard is incomplete (see "
                           f"{w.log}); --resume measures the rest")
        return out

    # -- the merged folder -----------------------------------------------------------------
    def write_merged(self, started: str, wall_s: float) -> None:
        from dqprof.sweep import plan

        records = gather(self.run_dir)
        order = {k: i for i, k in enumerate(k for g in plan(self.cfg)[1] for k in g.keys)}
        merged = sorted(records.values(), key=lambda r: (order.get(r["key"], len(order)),
                                                         r["key"]))
        rewrite_records(kernels_path(self.run_dir), merged)
        runs = [(w, read_run(w.folder)) for w in self.workers]
        info = dict(self.previous)
        first = next((r for _, r in runs if r.get("environment")), {})
        info.setdefault("schema", first.get("schema", 1))
        info.setdefault("kind", "kernels")
        info.setdefault("model", self.model)
        info.setdefault("created", started)
        for key in ("environment", "ceilings", "idle_power_w"):
            if key not in info and key in first:
                info[key] = first[key]
        info["config"] = self.cfg.as_dict()
        boards = {b["uuid"]: b for b in info.get("boards") or []}
        for w, run in runs:
            gpu = (run.get("environment") or {}).get("gpu") or {}
            entry = boards.setdefault(w.gpu.uuid, {"uuid": w.gpu.uuid, "name": w.gpu.name,
                                                   "shards": []})
            entry.update({k: v for k, v in {
                "name": gpu.get("name") or w.gpu.name, "driver": gpu.get("driver"),
                "power_limit_w": gpu.get("power_limit_w"), "host": (run.get("environment")
                                                                    or {}).get("host"),
                "idle_power_w": run.get("idle_power_w"), "ceilings": run.get("ceilings")
            }.items() if v is not None})
            where = str(w.folder.relative_to(self.run_dir))
            if where not in entry["shards"]:
                entry["shards"].append(where)
        info["boards"] = list(boards.values())
        info.setdefault("sessions", []).append({
            "started": started, "finished": _now(), "wall_s": wall_s, "runner": "--gpus",
            "workers": [{"gpu": dataclasses.asdict(w.gpu), "shard": f"{w.shard[0]}/{w.shard[1]}",
                         "folder": str(w.folder.relative_to(self.run_dir)),
                         "exit_code": w.exit_code, "points": len(w.keys), "recorded": w.done,
                         "complete": w.done >= len(w.keys),
                         "sessions": run.get("sessions") or []} for w, run in runs]})
        incomplete = [f"{w.shard[0]}/{w.shard[1]} on GPU {w.gpu.index} ({w.gpu.uuid})"
                      for w in self.workers if w.done < len(w.keys) or w.exit_code]
        if incomplete:
            info["incomplete"] = incomplete
        else:
            info.pop("incomplete", None)
        info["records"] = len(merged)
        write_run(self.run_dir, info)


def run_parallel(cfg: Any, run_dir: Path, spec: str, resume: bool = False,
                 retry_failed: bool = False, show: Callable[[str], None] | None = None,
                 command: Callable[[Path], list[str]] | None = None) -> tuple[Runner, int]:
    runner = Runner(cfg, run_dir, spec, resume, retry_failed, command, show)
    return runner, runner.run()


def worker_main(folder: Path) -> int:
    """One worker: the sweep of its shard into its folder (seeded with what is recorded)."""
    from dqprof.sweep import Sweep

    spec = json.loads((folder / WORKER_FILE).read_text())
    try:
        sweep = Sweep(config_from_json(spec["config"]), folder, resume=True,
                      retry_failed=spec["retry_failed"])
        counts = sweep.run()
    except DqprofError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    for w in sweep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{folder}: {counts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(Path(sys.argv[1])))
