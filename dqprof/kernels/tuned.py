"""Tuned tile tables for triton-nf4, kept as data per GPU (``configs/<gpu>.json``).

A table maps (N, K, an M bucket) to the tile config `dqprof tune` measured fastest on one GPU
model. Lookup is exact on N and K and takes the smallest bucket whose ``m_max`` covers M; no
match (another model's shapes, M past the last bucket) falls back to the heuristic. A file made
on another GPU, or one that does not parse, is ignored with a warning: never a wrong config.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"
ENV_VAR = "DQPROF_NF4_CONFIG"  # a table file to use instead of the bundled ones
SCHEMA = 1


@dataclass(frozen=True)
class TunedTable:
    gpu: str
    path: str
    entries: dict[tuple[int, int], list[tuple[int, dict[str, Any]]]]  # (n, k) -> [(m_max, cfg)]

    def lookup(self, m: int, n: int, k: int) -> Any:
        from dqprof.kernels.triton_nf4 import GEMV_MAX_M, TileConfig

        for m_max, cfg in self.entries.get((n, k), ()):
            if m <= m_max:
                if cfg["kernel"] == "gemv" and m > GEMV_MAX_M:
                    return None
                names = {f.name for f in fields(TileConfig)}
                return TileConfig(**{key: v for key, v in cfg.items() if key in names})
        return None


def parse_table(data: dict[str, Any], path: str) -> TunedTable:
    """A table from its JSON; ValueError naming what is wrong."""
    from dqprof.kernels.triton_nf4 import DECODES, KERNELS

    if data.get("schema") != SCHEMA or not isinstance(data.get("entries"), list):
        raise ValueError(f"not a schema-{SCHEMA} triton-nf4 table")
    entries: dict[tuple[int, int], list[tuple[int, dict[str, Any]]]] = {}
    for i, e in enumerate(data["entries"]):
        try:
            cfg = dict(e["config"])
            if cfg.get("kernel") not in KERNELS:
                raise ValueError(f"kernel {cfg.get('kernel')!r}")
            for key in ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages"):
                if not isinstance(cfg.get(key), int) or cfg[key] < 1:
                    raise ValueError(f"{key}={cfg.get(key)!r}")
            if cfg.get("decode", DECODES[0]) not in DECODES:  # absent: the default decode
                raise ValueError(f"decode {cfg['decode']!r}")
            entries.setdefault((int(e["n"]), int(e["k"])), []).append((int(e["m_max"]), cfg))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"entry {i}: {err}") from None
    for rows in entries.values():
        rows.sort(key=lambda r: r[0])
    return TunedTable(str(data.get("gpu", "")), path, entries)


def load_table(path: Path, gpu_name: str | None) -> TunedTable | None:
    """The table in ``path`` if it parses and was made on ``gpu_name`` (None: any GPU)."""
    try:
        table = parse_table(json.loads(Path(path).read_text()), str(path))
    except (OSError, ValueError) as e:
        warnings.warn(f"triton-nf4: ignoring tuned table {path}: {e}; using the heuristic",
                      stacklevel=2)
        return None
    if gpu_name is not None and table.gpu != gpu_name:
        made_on = table.gpu or "an unnamed GPU"
        warnings.warn(f"triton-nf4: tuned table {path} was made on {made_on}, not {gpu_name}; "
                      "using the heuristic", stacklevel=2)
        return None
    return table


@functools.cache
def table_for_gpu(gpu_name: str) -> TunedTable | None:
    """$DQPROF_NF4_CONFIG if set, else the bundled table made on this GPU model, else None."""
    forced = os.environ.get(ENV_VAR)
    if forced:
        return load_table(Path(forced), gpu_name)
    for path in sorted(CONFIG_DIR.glob("*.json")):
        try:
            gpu = json.loads(path.read_text()).get("gpu")
        except (OSError, ValueError, AttributeError):
            gpu = None
        if gpu == gpu_name:
            return load_table(path, gpu_name)
    return None


def table_for_device(device: Any) -> TunedTable | None:
    import torch

    return table_for_gpu(torch.cuda.get_device_name(device))
