"""bf16 reference path: ``torch.nn.functional.linear`` (cuBLAS on CUDA)."""

from __future__ import annotations

import torch

from dqprof.bytemodel import Traffic, bf16_gemm
from dqprof.kernels import register
from dqprof.kernels.base import Backend
from dqprof.models.shapes import LinearShape


@register
class Bf16(Backend):
    name = "bf16"
    description = "bf16 weight, torch linear (cuBLAS); also the GEMM half of dequantize+matmul"
    devices = ("cuda", "cpu")
    quantized = False

    def prepare(self, weight: torch.Tensor, shape: LinearShape) -> torch.Tensor:
        return weight.to(torch.bfloat16).contiguous()

    def __call__(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, state)

    def reference(self, state: torch.Tensor) -> torch.Tensor:
        return state.float()

    def traffic(self, shape: LinearShape, m: int, kernels: list[dict] | None = None) -> Traffic:
        return bf16_gemm(m, shape.n, shape.k)
