"""bitsandbytes NF4, as vLLM 0.20.2 runs it, and its dequantize half on its own.

vLLM quantizes each shard of a fused layer at load time (``quantize_4bit``, NF4, default
blocksize 64, compressed statistics), then undoes the nesting at load so its kernels read one
fp32 absmax per block (vllm/model_executor/model_loader/bitsandbytes_loader.py,
``dequantize_dq``: "avoiding this computational overhead during inference"), and calls
``matmul_4bit`` once per shard, copying every result into a freshly allocated fused output
(vllm/model_executor/layers/quantization/bitsandbytes.py, ``_apply_bnb_4bit``). Until
session 6 this backend kept the nested statistics, so every call above the GEMV's M also ran
bitsandbytes' absmax dequantize (``kDequantizeBlockwise<float, ...>``, 5 us of 128 at
mlp.gate_up_proj M=256 in profiles/h200/kernels.jsonl) that vLLM does not run.
bitsandbytes >= 0.50 picks per (M, N, K) between its
fused ``gemm_4bit`` kernel and dequantize + bf16 GEMM; the attribution shows which ran.
"""

from __future__ import annotations

from typing import Any

import torch

from dqprof.bytemodel import Traffic, bnb_nf4_layer, nf4_dequantize
from dqprof.kernels import register
from dqprof.kernels.base import Backend
from dqprof.kernels.nf4 import bnb_absmax, dequantize_nf4
from dqprof.models.shapes import LinearShape

BLOCKSIZE = 64


def _quantize_shards(weight: torch.Tensor, shape: LinearShape) -> list[tuple[torch.Tensor, Any]]:
    from bitsandbytes.functional import quantize_4bit

    shards, start = [], 0
    for size in shape.shards:
        w = weight[start:start + size].to(torch.bfloat16).contiguous()
        packed, qs = quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True,
                                   quant_type="nf4")
        shards.append((packed, _plain_statistics(qs)))
        start += size
    return shards


def _plain_statistics(qs: Any) -> Any:
    """What vLLM's loader does to each quantized shard (``dequantize_dq``): the nested absmax
    decoded once to fp32, so no call decodes it again."""
    from bitsandbytes.functional import dequantize_blockwise

    if qs.nested:
        absmax = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        qs.absmax, qs.nested, qs.offset, qs.state2 = absmax.float(), False, None, None
    return qs


def _reference(shards: list[tuple[torch.Tensor, Any]]) -> torch.Tensor:
    # Our own NF4 decoder, not bitsandbytes', so a wrong bitsandbytes kernel fails the check.
    return torch.cat([dequantize_nf4(p, bnb_absmax(qs), tuple(qs.shape), qs.blocksize)
                      for p, qs in shards])


def _fused_path(kernels: list[dict] | None) -> bool:
    """True when no dequantize kernel ran (bitsandbytes' fused gemm_4bit took the call);
    without an attribution (CPU runs) the fused path's minimum bytes are counted."""
    if kernels is None:
        return True
    return not any(k.get("category") == "dequant" for k in kernels)


@register
class BnbNf4(Backend):
    name = "bnb-nf4"
    description = "bitsandbytes matmul_4bit per shard + copy into the fused output (vLLM)"
    requires = ("bitsandbytes",)
    devices = ("cuda", "cpu")

    def prepare(self, weight: torch.Tensor, shape: LinearShape) -> list:
        return _quantize_shards(weight, shape)

    def __call__(self, state: list, x: torch.Tensor) -> torch.Tensor:
        from bitsandbytes import matmul_4bit

        bf_x = x.to(torch.bfloat16)
        n = sum(qs.shape[0] for _, qs in state)
        out = torch.empty(x.shape[0], n, dtype=torch.bfloat16, device=x.device)
        start = 0
        for packed, qs in state:
            size = qs.shape[0]
            out[:, start:start + size] = matmul_4bit(bf_x, packed.t(), qs)
            start += size
        return out

    def reference(self, state: list) -> torch.Tensor:
        return _reference(state)

    def traffic(self, shape: LinearShape, m: int, kernels: list[dict] | None = None) -> Traffic:
        return bnb_nf4_layer(m, shape.shards, shape.k, fused=_fused_path(kernels))


@register
class BnbDequant(BnbNf4):
    """The same quantized shards as bnb-nf4; only the dequantize kernels run."""

    name = "bnb-dequant"
    description = "bitsandbytes dequantize_4bit alone, per shard: the dequantization tax"
    m_independent = True

    def __call__(self, state: list, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from bitsandbytes.functional import dequantize_4bit

        return tuple(dequantize_4bit(packed, qs) for packed, qs in state)

    def expected(self, state: list, x: torch.Tensor) -> torch.Tensor:
        return self.reference(state)

    def traffic(self, shape: LinearShape, m: int, kernels: list[dict] | None = None) -> Traffic:
        total = Traffic()
        for n in shape.shards:
            total = total + nf4_dequantize(n, shape.k)
        return total

    def flops(self, shape: LinearShape, m: int) -> int:
        return 0
