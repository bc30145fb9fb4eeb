"""torch's fused int4 GEMM ("tinygemm"): ``aten._weight_int4pack_mm``, group 128.

Asymmetric per-group quantization; the kernel computes w = (q - 8) * scale + zero with bf16
scale and zero per group. On CPU the ``_for_cpu`` twins run the same math (CI uses them).
Shape rule: K % 128 == 0 (group and inner k-tiles of 8 x 16), N % 8 == 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dqprof.bytemodel import GROUP, Traffic, int4_grouped
from dqprof.kernels import register
from dqprof.kernels.base import Backend
from dqprof.models.shapes import LinearShape

INNER_K_TILES = 8


@dataclass
class Int4State:
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # [k / group, n, 2] bf16
    ref: torch.Tensor  # dequantized [n, k] fp32 from the bf16 scales the kernel uses


def quantize_int4_grouped(weight: torch.Tensor, group: int = GROUP
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n, k] -> (codes int32 [n, k] in 0..15, scale bf16 [n, g], zero bf16 [n, g])."""
    n, k = weight.shape
    wg = weight.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    # round against the bf16 parameters the kernel will use, so the codes fit them best
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    return q.reshape(n, k).to(torch.int32), scale, zero


def dequantize_int4_grouped(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                            group: int = GROUP) -> torch.Tensor:
    s = scale.float().repeat_interleave(group, dim=1)
    z = zero.float().repeat_interleave(group, dim=1)
    return (q.float() - 8) * s + z


@register
class TinygemmInt4(Backend):
    name = "tinygemm-int4"
    description = "torch aten._weight_int4pack_mm (tinygemm), asymmetric int4, group 128"
    devices = ("cuda", "cpu")

    def supports(self, shape: LinearShape) -> str | None:
        if reason := super().supports(shape):
            return reason
        if shape.k % (INNER_K_TILES * 16) or shape.k % GROUP or shape.n % 8:
            return f"tinygemm needs K % 128 == 0 and N % 8 == 0 (N={shape.n}, K={shape.k})"
        return None

    def prepare(self, weight: torch.Tensor, shape: LinearShape) -> Int4State:
        q, scale, zero = quantize_int4_grouped(weight)
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        if weight.is_cuda:
            q8 = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(q8, INNER_K_TILES)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES)
        return Int4State(packed, sz, dequantize_int4_grouped(q, scale, zero))

    def __call__(self, st: Int4State, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return torch.ops.aten._weight_int4pack_mm(x, st.packed, GROUP, st.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, st.packed, GROUP,
                                                          st.scales_and_zeros)

    def reference(self, st: Int4State) -> torch.Tensor:
        return st.ref

    def clone(self, st: Int4State) -> Int4State:
        return Int4State(st.packed.clone(), st.scales_and_zeros.clone(), st.ref)

    def traffic(self, shape: LinearShape, m: int, kernels: list[dict] | None = None) -> Traffic:
        return int4_grouped(m, shape.n, shape.k, "bf16")
