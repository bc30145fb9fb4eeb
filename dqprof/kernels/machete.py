"""vLLM's Machete mixed-input GEMM (CUTLASS, Hopper only) on weights packed as vLLM packs them.

On sm_90, vLLM 0.20.2 serves GPTQ and AWQ checkpoints through MacheteLinearKernel, not Marlin
(its kernel choice puts Machete first where it can implement the layer; the H200 full-model
logs say "Using MacheteLinearKernel for GPTQMarlinLinearMethod"). These paths are what
``gptq_marlin`` / ``awq_marlin`` run on an H100/H200; ``marlin-*`` is what they run elsewhere.

``machete-gptq``: uint4b8, group 128, no zero points. ``machete-awq``: uint4 with zero points,
which Machete takes pre-multiplied by the scales (bf16 ``-scale * zp`` per group), as vLLM's
``transform_w_zp`` leaves them. The call is ``ops.machete_mm`` on ``machete_prepack_B``'d
weights (vLLM's ``apply_weights``). Shape rule (vLLM's check_machete_supports_shape): K % 64
== 0 and N % 128 == 0; K % 128 == 0 for group 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dqprof.bytemodel import GROUP, Traffic, int4_grouped
from dqprof.kernels import register
from dqprof.kernels.base import Backend
from dqprof.models.shapes import LinearShape

BLOCK_K, BLOCK_N = 64, 128  # vLLM's MACHETE_PREPACKED_BLOCK_SHAPE
CAPABILITY = (9, 0)
# The sweep's old energy feeder (8 chunks of replays kept queued, an event polled per chunk)
# stalled the GPU with Machete every time (profiles/h200/machete/); the batch-sync feeder
# (dqprof/measure/energy.py) is what a harness ran Machete's windows through without a stall


@dataclass
class MacheteState:
    qweight: torch.Tensor  # prepacked
    scales: torch.Tensor  # [k / group, n] bf16
    zeros: torch.Tensor | None  # [k / group, n] bf16, -scale * zp (AWQ only)
    ref: torch.Tensor  # dequantized weight [n, k], for the correctness check


class _Machete(Backend):
    requires = ("vllm",)
    zero_points = False

    def unavailable(self, device: str) -> str | None:
        if reason := super().unavailable(device):
            return reason
        if torch.cuda.is_available() and torch.cuda.get_device_capability() != CAPABILITY:
            cap = ".".join(map(str, torch.cuda.get_device_capability()))
            return f"Machete runs on compute capability 9.0 (Hopper) only; this GPU is {cap}"
        return None

    def supports(self, shape: LinearShape) -> str | None:
        if reason := super().supports(shape):
            return reason
        if shape.k % BLOCK_K or shape.n % BLOCK_N or shape.k % GROUP:
            return (f"Machete needs K % {BLOCK_K} == 0, N % {BLOCK_N} == 0 and K % {GROUP} == 0"
                    f" (N={shape.n}, K={shape.k})")
        return None

    def _types(self) -> object:  # vllm's ScalarType (vllm is imported lazily)
        from vllm.scalar_type import scalar_types

        return scalar_types.uint4 if self.zero_points else scalar_types.uint4b8

    def prepare(self, weight: torch.Tensor, shape: LinearShape) -> MacheteState:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils.quant_utils import (
            pack_rows,
            quantize_weights,
        )

        wtype = self._types()
        w = weight.to(torch.bfloat16).t().contiguous()  # vLLM quantizes [k, n]
        # Machete applies zero points after the scales; a reference built the same way keeps
        # the check's tolerance honest for AWQ
        ref, q, s, zp = quantize_weights(w, wtype, GROUP, zero_points=self.zero_points,
                                         ref_zero_points_after_scales=True)
        packed = pack_rows(q, wtype.size_bits, *q.shape).t().contiguous().t()  # column major
        qweight = ops.machete_prepack_B(packed, torch.bfloat16, wtype, torch.bfloat16)
        s = s.to(torch.bfloat16).contiguous()
        zeros = (-s * zp.to(s.dtype)).contiguous() if self.zero_points else None
        return MacheteState(qweight, s, zeros, ref.t().contiguous())

    def __call__(self, st: MacheteState, x: torch.Tensor) -> torch.Tensor:
        from vllm import _custom_ops as ops

        return ops.machete_mm(a=x, b_q=st.qweight, b_type=self._types(), b_group_zeros=st.zeros,
                              b_group_scales=st.scales, b_group_size=GROUP)

    def reference(self, st: MacheteState) -> torch.Tensor:
        return st.ref.float()

    def clone(self, st: MacheteState) -> MacheteState:
        # rotated copies share the reference weight: it only serves the correctness check
        return MacheteState(st.qweight.clone(), st.scales.clone(),
                            None if st.zeros is None else st.zeros.clone(), st.ref)

    def traffic(self, shape: LinearShape, m: int, kernels: list[dict] | None = None) -> Traffic:
        return int4_grouped(m, shape.n, shape.k, "bf16" if self.zero_points else None)


@register
class MacheteGptq(_Machete):
    name = "machete-gptq"
    description = ("vLLM Machete int4 GEMM (Hopper), uint4b8 symmetric, group 128 "
                   "(gptq_marlin on sm_90)")


@register
class MacheteAwq(_Machete):
    name = "machete-awq"
    description = ("vLLM Machete int4 GEMM (Hopper), uint4 + zero points, group 128 "
                   "(awq_marlin on sm_90)")
    zero_points = True
