"""GEMM paths, one module each, registered by name (``dqprof bench --backends``).

Paths come from dqprof's own modules (``_load_all``) and from other installed packages
through the entry-point group ``dqprof.backends``: each entry point names a ``Backend``
subclass (``mypkg.gemm:MyBackend``) or a module whose import registers its backends with
``@register``. One that fails to import, names no backend, or takes a built-in path's name
is left out; ``load_failures()`` says why (``dqprof backends`` prints it).
"""

from __future__ import annotations

import re
from importlib import metadata

from dqprof.errors import DqprofError
from dqprof.kernels.base import Backend

_REGISTRY: dict[str, type[Backend]] = {}
ENTRY_POINT_GROUP = "dqprof.backends"
_ORIGIN: dict[str, str] = {}  # backend name -> where it comes from (entry point and package)
_FAILURES: dict[str, str] = {}  # "entry point = value (package)" -> why it was not loaded
_discovered = False
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
    _discover()


def _discover() -> None:
    """Load the ``dqprof.backends`` entry points of installed packages, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown package"
        where = f"entry point {ep.name} = {ep.value} ({dist})"
        before = dict(_REGISTRY)
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the built-in paths down
            _FAILURES[where] = f"import failed: {type(e).__name__}: {e}"
            continue
        is_backend = isinstance(obj, type) and issubclass(obj, Backend)
        if is_backend and obj.name and _REGISTRY.get(obj.name) is not obj:
            _REGISTRY[obj.name] = obj
        added = [n for n, c in _REGISTRY.items() if before.get(n) is not c]
        taken = [n for n in added if n in before]
        for n in taken:  # a plugin never replaces a path that was there first
            _REGISTRY[n] = before[n]
            _FAILURES[where] = (f"backend name '{n}' is taken by {_origin(n)}; "
                                f"choose another `name`")
        for n in (n for n in added if n not in taken):
            _ORIGIN[n] = where
        if not added and where not in _FAILURES:
            _FAILURES[where] = ("registers no backend: name a Backend subclass with a unique "
                                "`name` (module:Class), or a module that uses @register")


def _origin(name: str) -> str:
    return _ORIGIN.get(name) or _REGISTRY[name].__module__


def backend_origin(name: str) -> str:
    """Where a registered path comes from: dqprof's module, or an entry point's package."""
    _load_all()
    return _origin(name)


def load_failures() -> dict[str, str]:
    """Entry points that gave no backend, and why."""
    _load_all()
    return dict(_FAILURES)


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


__all__ = ["Backend", "register", "create", "parse_backends", "backend_names", "DEFAULT_BACKENDS",
           "ENTRY_POINT_GROUP", "backend_origin", "load_failures"]
