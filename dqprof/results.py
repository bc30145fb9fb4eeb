"""Run folders: run.json (the environment) and kernels.jsonl (one record per measured point).

Records are appended and flushed (and fsynced) as each point finishes, so a killed sweep loses
at most the point in flight; ``load_records`` drops a torn last line and names the file and
line of any other unreadable one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dqprof.errors import DqprofError

SCHEMA_VERSION = 1
RUN_FILE = "run.json"
KERNELS_FILE = "kernels.jsonl"
STATUSES = ("ok", "skipped", "failed")
REQUIRED = ("schema", "key", "model", "layer", "n", "k", "m", "backend", "variant", "status")


def point_key(model: str, layer: str, m: int, backend: str, variant: str = "") -> str:
    """The identity of a point: what resume, merge and regress match on."""
    return f"{model}|{layer}|m={m}|{backend}|{variant}"


def kernels_path(run_dir: Path) -> Path:
    return Path(run_dir) / KERNELS_FILE


def read_run(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / RUN_FILE
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DqprofError(f"{p}: not valid JSON ({e})") from e


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file so that a crash leaves the old one or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run(run_dir: Path, info: dict[str, Any]) -> None:
    write_atomic(Path(run_dir) / RUN_FILE,
                 json.dumps(info, indent=1, sort_keys=True, default=str) + "\n")


class RecordWriter:
    """Appends records, one line each, durable before the next point starts."""

    def __init__(self, run_dir: Path, filename: str = KERNELS_FILE):
        self.path = Path(run_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._f = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rewrite_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace a results file atomically (used to drop failed points before a retry)."""
    write_atomic(path, "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n"
                               for r in records))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _drop_torn_tail(path: Path) -> None:
    """A kill mid-write can leave a last line without its newline: cut it off."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(cut)


def load_records(path: Path, allow_torn_tail: bool = True, filename: str = KERNELS_FILE,
                 check: Callable[[Any], str | None] | None = None) -> list[dict[str, Any]]:
    """Every record of a results file (or of ``filename`` in a run folder), validated by
    ``check`` (default: the kernel-record schema)."""
    path = Path(path)
    if path.is_dir():
        path = path / filename
    if not path.exists():
        raise DqprofError(f"{path}: no such results file")
    check = check or validate
    lines = path.read_text().split("\n")
    torn_tail = lines[-1] != ""
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and torn_tail and allow_torn_tail:
                break  # the point in flight when a sweep was killed; it will be redone
            raise DqprofError(f"{path}:{i}: corrupt record ({e.msg})") from e
        problem = check(rec)
        if problem:
            raise DqprofError(f"{path}:{i}: {problem}")
        records.append(rec)
    return records


def validate(rec: Any, required: tuple[str, ...] = REQUIRED, kind: str | None = None
             ) -> str | None:
    """Why ``rec`` is not a record of this schema (and of ``kind`` if given), or None."""
    if not isinstance(rec, dict):
        return "record is not a JSON object"
    missing = [f for f in required if f not in rec]
    if missing:
        return f"record lacks {', '.join(missing)}"
    if kind is not None and rec.get("kind") != kind:
        return f"not a {kind} record (kind {rec.get('kind')!r})"
    if rec["schema"] != SCHEMA_VERSION:
        return (f"schema version {rec['schema']} (this dqprof reads {SCHEMA_VERSION}); "
                f"use the dqprof release that wrote it")
    if rec["status"] not in STATUSES:
        return f"unknown status '{rec['status']}'"
    return None


def normal_uuid(uuid: Any) -> str | None:
    """A GPU UUID as NVML writes it ("GPU-..."); torch gives it without the prefix."""
    if not uuid or not isinstance(uuid, str):
        return None
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def board_identity(env: dict[str, Any]) -> dict[str, Any] | None:
    """{uuid, name} of the GPU an environment (run.json's ``environment``) describes; None on
    CPU. Boards of one model differ in power: the gate tells a new board from a new kernel
    by this."""
    gpu = env.get("gpu") if isinstance(env, dict) else None
    if not isinstance(gpu, dict):
        return None
    return {"uuid": normal_uuid(gpu.get("uuid")), "name": gpu.get("name")}


def record_board(rec: dict[str, Any], run: dict[str, Any]) -> str | None:
    """The UUID of the board that measured ``rec``: its own ``board`` field, else its run's
    GPU (records written before dqprof kept ``board``) where the run had one board; None where
    neither says."""
    own = normal_uuid(dig(rec, "board", "uuid"))
    if own:
        return own
    boards = run.get("boards") if isinstance(run, dict) else None
    if isinstance(boards, list) and len(boards) > 1:  # merged from several boards: the run's
        return None  # environment is its first source's, not necessarily this record's
    return normal_uuid(dig(run, "environment", "gpu", "uuid"))


def dig(rec: Any, *path: str) -> Any:
    """rec[a][b]... or None where any level is missing or not a dict."""
    for p in path:
        if not isinstance(rec, dict):
            return None
        rec = rec.get(p)
    return rec
