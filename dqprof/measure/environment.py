"""What a run ran on: GPU, driver, library versions, git commit."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "bitsandbytes", "triton", "vllm", "transformers", "nvidia-ml-py", "numpy",
            "dqprof")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict[str, Any]:
    # A tree copied onto another machine may carry a stale .git (seen on the lent GPU machine:
    # HEAD one commit behind, the difference showing as "dirty"); whoever copied it knows the
    # commit, so DQPROF_GIT_COMMIT wins over git.
    named = os.environ.get("DQPROF_GIT_COMMIT")
    if named:
        return {"commit": named, "dirty": None, "source": "DQPROF_GIT_COMMIT"}
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        if not re.fullmatch(r"[0-9a-f]{40}", sha):  # no history here (a copied tree):
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "dqprof"], capture_output=True, text=True, timeout=5).stdout
        return {"commit": sha, "dirty": bool(dirty.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def source_digest(root: Path | None = None) -> str:
    """sha256 over the package's source and bundled tables (paths and bytes, sorted): names
    the code that ran even where git cannot (a dirty or copied tree); `dqprof` at any commit
    gives the same digest for the same files."""
    root = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json", ".toml")
                       and "__pycache__" not in p.parts):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def gpu_info(device_index: int = 0) -> dict[str, Any]:
    import torch

    p = torch.cuda.get_device_properties(device_index)
    return {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "sms": p.multi_processor_count,
        "memory_bytes": p.total_memory,
        "l2_bytes": getattr(p, "L2_cache_size", None),
        "cuda_runtime": torch.version.cuda,
        "uuid": str(getattr(p, "uuid", "")) or None,  # ties the records to NVML's device
    }


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions(),
        "git": git_commit(),
        "source_sha256": source_digest(),
        "device": device,
    }
    if device == "cuda":
        env["gpu"] = gpu_info()
    else:
        env["cpu"] = {"processor": platform.processor() or platform.machine()}
    return env
