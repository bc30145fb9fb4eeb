"""``torch.ops.dqprof.nf4_linear``: how vLLM's compiled graphs call the triton-nf4 kernel.

torch.compile must not trace into the kernel's Python launcher (tile choice, grid, split-K
workspace), so each quantized linear is one opaque custom op with a fake implementation that
only states the output's shape. The op takes the layer's key (its vLLM prefix, a constant in
the graph) and looks the packed weight up here, as vLLM's own attention op looks its KV cache
up by layer name: the kernel's state stays whatever ``TritonNf4.prepare`` returns, so this
module does not depend on its fields. Under CUDA graphs the op is captured like any kernel
launch (the backend allocates only with ``torch.empty``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# key -> (kernel call (state, x) -> y, state, out_features)
_BOUND: dict[str, tuple[Callable[[Any, torch.Tensor], torch.Tensor], Any, int]] = {}


def bind(key: str, kernel: Callable[[Any, torch.Tensor], torch.Tensor], state: Any,
         out_features: int) -> None:
    """Make ``nf4_linear(x, key, out_features)`` run ``kernel(state, x)``."""
    _BOUND[key] = (kernel, state, out_features)


def bound_keys() -> list[str]:
    return list(_BOUND)


def unbind_all() -> None:
    _BOUND.clear()


@torch.library.custom_op("dqprof::nf4_linear", mutates_args=())
def nf4_linear(x: torch.Tensor, key: str, out_features: int) -> torch.Tensor:
    """y [m, out_features] bf16 = x [m, k] bf16 @ dequant(W).T, W bound under ``key``."""
    try:
        kernel, state, n = _BOUND[key]
    except KeyError:
        raise RuntimeError(f"dqprof::nf4_linear: no weight bound for layer '{key}'") from None
    if n != out_features:
        raise RuntimeError(f"dqprof::nf4_linear: layer '{key}' has {n} outputs, the graph "
                           f"expects {out_features}")
    return kernel(state, x)


@nf4_linear.register_fake
def _nf4_linear_fake(x: torch.Tensor, key: str, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))
