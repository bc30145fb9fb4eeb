"""GEMM paths, one module each, registered by name (``dqprof bench --backends``)."""

from __future__ import annotations

import re

from dqprof.errors import DqprofError
from dqprof.kernels.base import Backend

_REGISTRY: dict[str, type[Backend]] = {}
# The order users see in tables and plots: reference first, then each quantized path.
DEFAULT_BACKENDS = ("bf16", "bnb-nf4", "bnb-dequant", "marlin-gptq", "marlin-awq",
                    "machete-gptq", "machete-awq", "tinygemm-int4", "triton-nf4", "gemlite-int4",
                    "fp8", "fp8-channel")


def register(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    # Importing a module registers its backends; none imports an optional package at import time.
    from dqprof.kernels import bf16, bnb, fp8, gemlite, machete, marlin, tinygemm, triton_nf4  # noqa: F401


def backend_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY, key=lambda n: DEFAULT_BACKENDS.index(n)
                  if n in DEFAULT_BACKENDS else len(DEFAULT_BACKENDS))


_SPEC = re.compile(r"^(?P<name>[\w.-]+)(\[(?P<opts>[^\]]*)\])?$")


def _value(text: str) -> bool | int | float | str:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def create(spec: str) -> Backend:
    """A backend from a spec: ``bf16`` or ``marlin-gptq[use_fp32_reduce=false]``."""
    _load_all()
    m = _SPEC.match(spec.strip())
    if not m or m["name"] not in _REGISTRY:
        raise DqprofError(f"unknown backend '{spec}' (known: {', '.join(backend_names())})")
    opts = {}
    for item in filter(None, (m["opts"] or "").split(",")):
        key, _, val = item.partition("=")
        opts[key.strip()] = _value(val.strip())
    try:
        return _REGISTRY[m["name"]](**opts)
    except ValueError as e:
        raise DqprofError(str(e)) from e


def parse_backends(text: str | None) -> list[Backend]:
    """Comma-separated specs (commas inside [...] belong to the options); None: all."""
    if not text:
        return [create(n) for n in backend_names()]
    specs, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            specs.append(cur)
            cur = ""
        else:
            cur += ch
    specs.append(cur)
    return [create(s) for s in specs if s.strip()]


__all__ = ["Backend", "register", "create", "parse_backends", "backend_names", "DEFAULT_BACKENDS"]
