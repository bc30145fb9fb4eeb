"""model.jsonl: one record per (quantization, workload, batch), appended durably.

The writer and loader of kernels.jsonl (dqprof.results): one JSON object a line, flushed and
fsynced per record, a torn last line dropped; ``schema`` and ``kind: "model"`` on every line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dqprof.results import SCHEMA_VERSION, RecordWriter, load_records
from dqprof.results import validate as validate_record

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


class ModelRecordWriter(RecordWriter):
    """kernels.jsonl's writer (append, flush, fsync, torn tail dropped) on model.jsonl."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir, MODEL_FILE)


def validate(rec: Any) -> str | None:
    return validate_record(rec, REQUIRED, kind="model")


def load_model_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a model.jsonl (or a run folder holding one), validated."""
    return load_records(path, filename=MODEL_FILE, check=validate)


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record of each key: a resumed run appends a redone point after its failure."""
    by_key: dict[str, dict[str, Any]] = {}
    for r in records:
        by_key.pop(r["key"], None)
        by_key[r["key"]] = r
    return list(by_key.values())
