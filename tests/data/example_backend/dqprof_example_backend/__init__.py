"""An example GEMM path from outside dqprof: int8 weights, one bf16 scale per output row,
dequantized on the fly (``torch`` only, so it runs on CPU and CUDA).

dqprof finds it through the ``dqprof.backends`` entry point in this package's pyproject.toml;
``pip install -e tests/data/example_backend`` and ``dqprof backends`` lists ``example-int8``.
"""

from __future__ import annotations

import torch

from dqprof.bytemodel import Traffic
from dqprof.kernels.base import Backend
from dqprof.models.shapes import LinearShape


class ExampleInt8(Backend):
    name = "example-int8"
    description = "example plugin: int8 weight, per-row bf16 scale, dequantize + torch linear"
    devices = ("cuda", "cpu")

    def prepare(self, weight: torch.Tensor, shape: LinearShape) -> tuple[torch.Tensor, ...]:
        w = weight.float()
        scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8)
        q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        return q, scale.to(torch.bfloat16)

    def __call__(self, state: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        q, scale = state
        return torch.nn.functional.linear(x, q.to(torch.bfloat16) * scale)

    def reference(self, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        q, scale = state
        return (q.to(torch.bfloat16) * scale).float()

    def traffic(self, shape: LinearShape, m: int, kernels: list[dict] | None = None) -> Traffic:
        n, k = shape.n, shape.k
        return Traffic(weight=n * k, scales=2 * n, act_in=2 * m * k, act_out=2 * m * n,
                       intermediate=2 * 2 * n * k)  # the bf16 weight written and read back
