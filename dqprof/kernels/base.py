"""The backend interface: one GEMM path, from a bf16 weight to ``y = x @ W.T``.

Adding a GEMM path is one module with a ``Backend`` subclass and a ``@register`` line.
"""

from __future__ import annotations

import copy
import importlib.util
from abc import ABC, abstractmethod
from typing import Any

import torch

from dqprof.bytemodel import Traffic, gemm_flops
from dqprof.models.shapes import LinearShape


class Backend(ABC):
    name: str = ""
    description: str = ""
    requires: tuple[str, ...] = ()  # importable modules the path needs
    devices: tuple[str, ...] = ("cuda",)
    quantized: bool = True  # False: the bf16 reference path, also runs unquantized layers
    m_independent: bool = False  # True: the work does not depend on M (measured once, m=0)
    options: dict[str, Any] = {}  # default options; a spec "name[key=value]" overrides them

    def __init__(self, **options: Any):
        unknown = set(options) - set(self.options)
        if unknown:
            raise ValueError(f"backend {self.name} has no option {', '.join(sorted(unknown))}"
                             f" (options: {', '.join(self.options) or 'none'})")
        self.opts = {**self.options, **options}

    @property
    def variant(self) -> str:
        """Options that differ from the defaults, canonically ordered ('' for the default)."""
        changed = {k: v for k, v in self.opts.items() if self.options.get(k) != v}
        return ",".join(f"{k}={v}" for k, v in sorted(changed.items()))

    def unavailable(self, device: str) -> str | None:
        """Why this backend cannot run here (missing package, wrong device), or None."""
        if device not in self.devices:
            return f"{self.name} runs on {', '.join(self.devices)} only"
        for mod in self.requires:
            if importlib.util.find_spec(mod) is None:
                return f"python package '{mod}' is not installed"
        return None

    def supports(self, shape: LinearShape) -> str | None:
        """Why this backend cannot take ``shape``, or None."""
        if self.quantized and not shape.quantized:
            return f"{shape.name} stays bf16 under every vLLM quantization"
        return None

    @abstractmethod
    def prepare(self, weight: torch.Tensor, shape: LinearShape) -> Any:
        """Quantize/pack a bf16 [n, k] weight into this path's state."""

    @abstractmethod
    def __call__(self, state: Any, x: torch.Tensor) -> torch.Tensor:
        """The timed call: x [m, k] bf16 -> y [m, n] bf16."""

    @abstractmethod
    def reference(self, state: Any) -> torch.Tensor:
        """The dequantized weight [n, k] in fp32 that ``__call__`` multiplies by."""

    @abstractmethod
    def traffic(self, shape: LinearShape, m: int, kernels: list[dict] | None = None) -> Traffic:
        """HBM bytes one call must move (``kernels``: the attribution, where the path
        depends on which kernels ran)."""

    def resident_bytes(self, shape: LinearShape) -> int:
        """Bytes of one weight copy that a call reads (sizes the rotation past L2)."""
        t = self.traffic(shape, 0)
        return t.weight + t.scales

    def flops(self, shape: LinearShape, m: int) -> int:
        return gemm_flops(m, shape.n, shape.k)

    def expected(self, state: Any, x: torch.Tensor) -> torch.Tensor:
        """What a correct call returns, in fp32 (m-independent paths override this)."""
        return x.float() @ self.reference(state).t()

    def clone(self, state: Any) -> Any:
        """A copy at new addresses (for rotating weights past L2)."""
        return copy.deepcopy(state)

    def launch_config(self, state: Any, m: int) -> dict[str, Any] | None:
        """The tiles this path picked for a call of M rows, where it picks them (recorded with
        the point, so a profile says which config each time belongs to); None elsewhere."""
        return None

