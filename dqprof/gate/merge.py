"""Join run folders (typically the shards of one sweep, ``bench --shard i/n``) into one.

Runs are only joined when they measured the same thing on the same kind of GPU: the sweep
config must match except for its ``shard`` field, and ``environment.gpu.name`` must match;
``force`` overrides both checks (never the duplicate check). A key recorded by two runs must
hold identical records, otherwise the merge stops: one of them would silently be lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqprof.errors import DqprofError
from dqprof.gate.compare import read_json
from dqprof.results import (
    KERNELS_FILE,
    RUN_FILE,
    kernels_path,
    load_records,
    write_atomic,
    write_run,
)


@dataclass
class Source:
    path: Path
    run: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def gpu(self) -> str:
        env = self.run.get("environment") or {}
        return (env.get("gpu") or {}).get("name") or f"no GPU ({env.get('device', '?')})"

    @property
    def config(self) -> dict[str, Any]:
        """The sweep config less what may differ between shards of one sweep: the shard, and
        the spelling of the suite file's path (its content still has to match)."""
        cfg = {k: v for k, v in (self.run.get("config") or {}).items() if k != "shard"}
        if isinstance(cfg.get("suite"), dict):
            cfg["suite"] = {k: v for k, v in cfg["suite"].items() if k != "path"}
        return cfg

    @property
    def shard(self) -> str:
        return str((self.run.get("config") or {}).get("shard", "1/1"))


@dataclass
class Merged:
    out: Path
    records: int
    duplicates: int  # identical records found in more than one source (kept once)
    warnings: list[str] = field(default_factory=list)


def load_source(path: Path) -> Source:
    path = Path(path)
    if not path.is_dir():
        raise DqprofError(f"{path}: not a run folder (merge joins folders holding "
                          f"{RUN_FILE} and {KERNELS_FILE})")
    run = read_json(path / RUN_FILE)
    if not run:
        raise DqprofError(f"{path}: no {RUN_FILE}: cannot tell what this run measured")
    return Source(path, run, load_records(kernels_path(path)))


def check_compatible(sources: list[Source]) -> list[str]:
    """What differs between the sources beyond their shard; empty when they may be joined."""
    first, problems = sources[0], []
    for s in sources[1:]:
        if s.gpu != first.gpu:
            problems.append(f"{s.path} ran on {s.gpu}, {first.path} on {first.gpu}")
        diff = sorted(k for k in first.config.keys() | s.config.keys()
                      if first.config.get(k) != s.config.get(k))
        if diff:
            problems.append(f"{s.path} and {first.path} differ in config: {', '.join(diff)}")
    return problems


def _shard(text: str) -> tuple[int, int] | None:
    i, _, n = text.partition("/")
    return (int(i), int(n)) if i.isdigit() and n.isdigit() else None


def _plan_size(sources: list[Source]) -> int | None:
    """n when every source is a shard i/n of the same n > 1; None otherwise."""
    parts = [_shard(s.shard) for s in sources]
    totals = {p[1] for p in parts if p}
    if None in parts or len(totals) != 1 or totals == {1}:
        return None
    return totals.pop()


def shard_warnings(sources: list[Source]) -> list[str]:
    """A shard set that does not cover its plan is worth saying (the merge still runs)."""
    n = _plan_size(sources)
    if n is None:
        return []
    lacking = sorted(set(range(1, n + 1)) - {_shard(s.shard)[0] for s in sources})  # type: ignore[index]
    if not lacking:
        return []
    return [f"shards {', '.join(f'{i}/{n}' for i in lacking)} are not among the sources: "
            f"the merged run covers part of the plan"]


def merged_shard(sources: list[Source]) -> str:
    """'1/1' when the sources are every shard of one plan (the result is a whole run)."""
    if _plan_size(sources) is not None and not shard_warnings(sources):
        return "1/1"
    return "+".join(sorted({s.shard for s in sources}))


def merge_runs(paths: list[Path], out: Path, force: bool = False) -> Merged:
    if not paths:
        raise DqprofError("merge needs at least one run folder")
    out = Path(out)
    if kernels_path(out).exists():
        raise DqprofError(f"{out} already holds results: choose another -o")
    sources = [load_source(p) for p in paths]
    warnings = []
    problems = check_compatible(sources)
    if problems and not force:
        raise DqprofError("refusing to merge runs that measured different things:\n  "
                          + "\n  ".join(problems) + "\n(pass --force to merge anyway)")
    warnings += [f"merged despite: {p}" for p in problems]
    warnings += shard_warnings(sources)

    records: dict[str, dict[str, Any]] = {}
    origin: dict[str, Path] = {}
    duplicates = 0
    for s in sources:
        for rec in s.records:
            key = rec["key"]
            if key in records:
                if records[key] != rec:
                    raise DqprofError(f"key '{key}' is recorded differently in {origin[key]} "
                                      f"and {s.path}: merge one of them only")
                duplicates += 1
                continue
            records[key], origin[key] = rec, s.path

    info = _merged_run_json(sources, len(records))
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(kernels_path(out),
               "".join(json.dumps(r, sort_keys=True) + "\n" for r in records.values()))
    write_run(out, info)
    return Merged(out, len(records), duplicates, warnings)


def _merged_run_json(sources: list[Source], n_records: int) -> dict[str, Any]:
    """The first source's run.json, its shard made whole, every source and session listed."""
    first = sources[0].run
    info = {k: v for k, v in first.items() if k != "sessions"}
    info["config"] = {**(first.get("config") or {}), "shard": merged_shard(sources)}
    info["merged_from"] = [
        {"path": str(s.path), "shard": s.shard, "records": len(s.records), "gpu": s.gpu,
         "host": (s.run.get("environment") or {}).get("host"),
         "commit": ((s.run.get("environment") or {}).get("git") or {}).get("commit"),
         "created": s.run.get("created"), "idle_power_w": s.run.get("idle_power_w")}
        for s in sources]
    info["sessions"] = [{**sess, "source": str(s.path)} for s in sources
                        for sess in s.run.get("sessions") or []]
    info["records"] = n_records
    return info
