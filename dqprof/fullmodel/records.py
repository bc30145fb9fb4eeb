"""model.jsonl: one record per (quantization, workload, batch), appended durably.

Same conventions as kernels.jsonl (dqprof.results): one JSON object a line, flushed and
fsynced per record, a torn last line dropped; ``schema`` and ``kind: "model"`` on every line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dqprof.errors import DqprofError
from dqprof.results import SCHEMA_VERSION, STATUSES

MODEL_FILE = "model.jsonl"
REQUIRED = ("schema", "kind", "key", "model", "quant", "workload", "batch", "status")


def model_path(run_dir: Path) -> Path:
    return Path(run_dir) / MODEL_FILE


def record_key(model: str, quant: str, workload: str, batch: int) -> str:
    return f"{model}|{quant}|{workload}|b={batch}"


def base_record(model: str, quant: str, workload: str, input_len: int, output_len: int,
                batch: int) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "kind": "model",
            "key": record_key(model, quant, workload, batch), "model": model, "quant": quant,
            "workload": workload, "input_len": input_len, "output_len": output_len,
            "batch": batch}


class ModelRecordWriter:
    def __init__(self, run_dir: Path):
        self.path = model_path(run_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):  # a kill mid-write: drop the torn line
                with self.path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._f = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ModelRecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def validate(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return "record is not a JSON object"
    missing = [f for f in REQUIRED if f not in rec]
    if missing:
        return f"record lacks {', '.join(missing)}"
    if rec["schema"] != SCHEMA_VERSION or rec["kind"] != "model":
        return f"not a model record of schema {SCHEMA_VERSION}"
    if rec["status"] not in STATUSES:
        return f"unknown status '{rec['status']}'"
    return None


def load_model_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a model.jsonl (or a run folder holding one), validated."""
    path = Path(path)
    if path.is_dir():
        path = model_path(path)
    if not path.exists():
        raise DqprofError(f"{path}: no such model results file")
    records = []
    lines = path.read_text().split("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break  # torn tail of a killed run
            raise DqprofError(f"{path}:{i}: corrupt record ({e.msg})") from e
        if problem := validate(rec):
            raise DqprofError(f"{path}:{i}: {problem}")
        records.append(rec)
    return records


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record of each key: a resumed run appends a redone point after its failure."""
    by_key: dict[str, dict[str, Any]] = {}
    for r in records:
        by_key.pop(r["key"], None)
        by_key[r["key"]] = r
    return list(by_key.values())
