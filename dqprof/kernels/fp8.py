"""vLLM's FP8 W8A8 linears (e4m3 weights and activations), as vLLM 0.20.2 runs them on sm_90.

What vLLM 0.20.2 does, read in its source:

- ``fp8``: ``quantization="fp8"`` on a bf16 checkpoint. ``Fp8Config.get_quant_method``
  (model_executor/layers/quantization/fp8.py) gives every linear ``Fp8OnlineLinearMethod``,
  whose ``process_weights_after_loading`` quantizes the whole (fused) weight once with
  ``ops.scaled_fp8_quant(weight, scale=None)``: one fp32 scale per tensor, amax / 448, computed
  by vLLM's own kernels; the stored weight is the fp8 ``qweight.t()`` ([k, n], column major).
  The activations are *not* quantized per tensor: ``Fp8LinearMethod.__init__`` picks
  ``kFp8DynamicTokenSym`` (dynamic, one scale per token) whenever ``cutlass_fp8_supported()``
  (w8a8_utils.py: ``ops.cutlass_scaled_mm_supports_fp8(capability)``, true on sm_89+ with a
  CUDA 12 build), and per-tensor only where CUTLASS FP8 is not supported.
- ``fp8-channel``: compressed-tensors' ``CompressedTensorsW8A8Fp8`` with the CHANNEL strategy
  and dynamic input (FP8-dynamic checkpoints): ``kFp8StaticChannelSym`` weights (one fp32
  scale per output channel, stored [n, 1]; llm-compressor computes it as the row's amax / 448)
  and the same ``kFp8DynamicTokenSym`` activations.
- The GEMM: both go through ``init_fp8_linear_kernel`` (model_executor/kernels/linear/
  __init__.py), which takes the first kernel of ``_POSSIBLE_FP8_KERNELS[CUDA]`` that is
  supported and can implement the layer: ``MarlinFP8ScaledMMLinearKernel`` declines on
  capability >= 89 (unless VLLM_TEST_FORCE_FP8_MARLIN), ``FlashInferFP8ScaledMMLinearKernel``
  needs capability >= 100 (and per-tensor activations), so on sm_90
  ``CutlassFP8ScaledMMLinearKernel`` is chosen for both paths; its ``apply_scaled_mm`` is
  ``ops.cutlass_scaled_mm`` (which itself uses CUTLASS when K and N are multiples of 16, as
  on every Gemma 4 layer, and ``triton_scaled_mm`` otherwise). ``torch._scaled_mm`` (the
  PerTensor/ChannelWise torch kernels) is only reached when CUTLASS is disabled, so no path
  here calls it.
- The activation quantize is ``FP8ScaledMMLinearKernel.apply_weights`` -> ``QuantFP8``, whose
  CUDA form is ``ops.scaled_fp8_quant(x, None, use_per_token_if_dynamic=True)`` (kernel
  ``vllm::dynamic_per_token_scaled_fp8_quant_kernel_strided``): that is what each timed call
  runs before the GEMM. In the full model under torch.compile (custom ops default to "none"
  with Inductor, and ``+quant_fp8`` is only added for block-quantized weights), QuantFP8 runs
  its ``forward_native`` instead: the same math, compiled by Inductor into a Triton kernel.

Below sm_89 vLLM runs FP8 weight-only through Marlin (W8A16), a different path: skipped here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dqprof.bytemodel import Traffic, fp8_w8a8
from dqprof.kernels import register
from dqprof.kernels.base import Backend
from dqprof.models.shapes import LinearShape

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's _FP8_MIN_SCALING_FACTOR (input_quant_fp8.py)
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada and Hopper


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's dynamic per-token FP8 quantization (QuantFP8.forward_native, the math its CUDA
    kernel implements): (fp8 [m, k], fp32 scale [m, 1])."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    q = (x.float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8-dynamic checkpoint's weight: one scale per output row, amax / 448 (llm-compressor's
    min-max observer, symmetric): (fp8 [n, k], fp32 scale [n, 1])."""
    amax = w.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize(weight_kn: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [n, k] from the stored fp8 [k, n] weight and its scale (one, or [n, 1])."""
    w = weight_kn.t().float()
    return w * (scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float())


@dataclass
class Fp8State:
    weight: torch.Tensor  # fp8 [k, n], column major: vLLM's layer.weight after .t()
    weight_scale: torch.Tensor  # fp32 [1] (per tensor) or [n, 1] (per channel)


class _Fp8(Backend):
    requires = ("vllm",)
    per_channel = False

    def unavailable(self, device: str) -> str | None:
        if reason := super().unavailable(device):
            return reason
        if torch.cuda.is_available() and torch.cuda.get_device_capability() < MIN_CAPABILITY:
            cap = ".".join(map(str, torch.cuda.get_device_capability()))
            return (f"FP8 W8A8 needs FP8 tensor cores (compute capability 8.9+); this GPU is "
                    f"{cap} (vLLM runs FP8 weight-only through Marlin there)")
        return None

    def prepare(self, weight: torch.Tensor, shape: LinearShape) -> Fp8State:
        w = weight.to(torch.bfloat16).contiguous()
        if self.per_channel:
            q, scale = quantize_per_channel(w)
        else:  # Fp8OnlineLinearMethod.process_weights_after_loading
            from vllm import _custom_ops as ops

            q, scale = ops.scaled_fp8_quant(w, scale=None)
        return Fp8State(q.t(), scale.to(torch.float32))

    def __call__(self, st: Fp8State, x: torch.Tensor) -> torch.Tensor:
        from vllm import _custom_ops as ops

        # FP8ScaledMMLinearKernel.apply_weights: QuantFP8 (CUDA op), then CUTLASS's apply_scaled_mm
        xq, xs = ops.scaled_fp8_quant(x, None, use_per_token_if_dynamic=True)
        return ops.cutlass_scaled_mm(xq, st.weight, scale_a=xs, scale_b=st.weight_scale,
                                     out_dtype=x.dtype)

    def reference(self, st: Fp8State) -> torch.Tensor:
        return dequantize(st.weight, st.weight_scale)

    def expected(self, st: Fp8State, x: torch.Tensor) -> torch.Tensor:
        # the activation rounding is part of the path: fp8's 3 mantissa bits alone put the
        # product ~2.6 % from x @ W (tests/test_fp8_gemlite.py), over the sweep's 2e-2 tolerance,
        # so the reference quantizes x as the path does and leaves bf16 output rounding
        xq, xs = quantize_per_token(x)
        return (xq.float() * xs) @ self.reference(st).t()

    def clone(self, st: Fp8State) -> Fp8State:
        return Fp8State(st.weight.t().clone().t(), st.weight_scale.clone())

    def traffic(self, shape: LinearShape, m: int, kernels: list[dict] | None = None) -> Traffic:
        return fp8_w8a8(m, shape.n, shape.k, self.per_channel)


@register
class Fp8Tensor(_Fp8):
    name = "fp8"
    description = ("vLLM quantization=fp8 on a bf16 checkpoint: e4m3 weight with one scale per "
                   "tensor, per-token dynamic activations, CUTLASS scaled_mm")


@register
class Fp8Channel(_Fp8):
    name = "fp8-channel"
    description = ("compressed-tensors FP8-dynamic: e4m3 weight with per-channel scales, "
                   "per-token dynamic activations, CUTLASS scaled_mm")
    per_channel = True
