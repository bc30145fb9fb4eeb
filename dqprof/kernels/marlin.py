"""vLLM's fused Marlin int4 GEMM on weights packed by vLLM's own utilities.

``marlin-gptq``: uint4b8 (symmetric, bias 8), group 128, no act-order, as gptq_marlin loads a
GPTQ checkpoint. ``marlin-awq``: uint4 with int4 zero points, group 128, as awq_marlin loads an
AWQ checkpoint. The call is vLLM's ``apply_gptq_marlin_linear`` / ``apply_awq_marlin_linear``.
Shape rule (vLLM's verify_marlin_supports_shape): N % 64 == 0, K % 128 == 0, K % group == 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dqprof.bytemodel import GROUP, Traffic, int4_grouped
from dqprof.kernels import register
from dqprof.kernels.base import Backend
from dqprof.models.shapes import LinearShape

MIN_THREAD_N, MIN_THREAD_K = 64, 128  # vLLM's GPTQ_MARLIN_MIN_THREAD_N / _K


@dataclass
class MarlinState:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor  # empty for uint4b8
    g_idx: torch.Tensor
    sort_idx: torch.Tensor
    workspace: torch.Tensor
    ref: torch.Tensor  # dequantized weight [n, k] (vLLM's w_ref), for the correctness check
    n: int
    k: int


class _Marlin(Backend):
    requires = ("vllm",)
    zero_points = False
    options = {"use_fp32_reduce": True}  # vLLM's USE_FP32_REDUCE_DEFAULT

    def supports(self, shape: LinearShape) -> str | None:
        if reason := super().supports(shape):
            return reason
        if shape.n % MIN_THREAD_N or shape.k % MIN_THREAD_K or shape.k % GROUP:
            return (f"Marlin needs N % {MIN_THREAD_N} == 0, K % {MIN_THREAD_K} == 0 and "
                    f"K % {GROUP} == 0 (N={shape.n}, K={shape.k})")
        return None

    def prepare(self, weight: torch.Tensor, shape: LinearShape) -> MarlinState:
        from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
        from vllm.model_executor.layers.quantization.utils import marlin_utils_test as mt
        from vllm.scalar_type import scalar_types

        w = weight.to(torch.bfloat16).t().contiguous()  # vLLM packs [k, n]
        dev = weight.device
        empty = mu.marlin_make_empty_g_idx(dev)
        if self.zero_points:
            ref, qw, s, zp = mt.awq_marlin_quantize(w, scalar_types.uint4, GROUP)
            g_idx, sort_idx = empty, empty
        else:
            ref, qw, s, g_idx, sort_idx, _ = mt.marlin_quantize(w, scalar_types.uint4b8, GROUP,
                                                                act_order=False)
            zp = empty
        return MarlinState(qw, s, zp, g_idx, sort_idx, mu.marlin_make_workspace_new(dev),
                           ref.t().contiguous(), shape.n, shape.k)

    def __call__(self, st: MarlinState, x: torch.Tensor) -> torch.Tensor:
        from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
        from vllm.scalar_type import scalar_types

        if self.zero_points:
            return mu.apply_awq_marlin_linear(
                x, st.qweight, st.scales, st.zeros, st.g_idx, st.sort_idx, st.workspace,
                scalar_types.uint4, output_size_per_partition=st.n, input_size_per_partition=st.k,
                use_fp32_reduce=self.opts["use_fp32_reduce"])
        return mu.apply_gptq_marlin_linear(
            x, st.qweight, st.scales, st.zeros, st.g_idx, st.sort_idx, st.workspace,
            scalar_types.uint4b8, output_size_per_partition=st.n, input_size_per_partition=st.k,
            is_k_full=True, use_fp32_reduce=self.opts["use_fp32_reduce"])

    def reference(self, st: MarlinState) -> torch.Tensor:
        return st.ref.float()

    def clone(self, st: MarlinState) -> MarlinState:
        # The reference copy is only for the check: rotated copies share it to save memory.
        return MarlinState(st.qweight.clone(), st.scales.clone(), st.zeros.clone(), st.g_idx,
                           st.sort_idx, st.workspace.clone(), st.ref, st.n, st.k)

    def traffic(self, shape: LinearShape, m: int, kernels: list[dict] | None = None) -> Traffic:
        return int4_grouped(m, shape.n, shape.k, "int4" if self.zero_points else None)


@register
class MarlinGptq(_Marlin):
    name = "marlin-gptq"
    description = "vLLM Marlin int4 GEMM, uint4b8 symmetric, group 128 (gptq_marlin)"


@register
class MarlinAwq(_Marlin):
    name = "marlin-awq"
    description = "vLLM Marlin int4 GEMM, uint4 + zero points, group 128 (awq_marlin)"
    zero_points = True
