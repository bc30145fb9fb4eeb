"""int4 round-to-nearest (RTN) quantization, group 128, and the GPTQ / AWQ checkpoint packings.

Codes, scales and zeros live here in the weight's own orientation ([n, k], groups along k).
Scales are rounded to fp16 first and the codes fitted to those fp16 scales, so unpacking a
checkpoint reproduces ``Rtn.dequantize()`` bit for bit.

GPTQ (v1 checkpoint format, as AutoGPTQ writes and vLLM's gptq/gptq_marlin read):
  qweight int32 [k/8, n], 8 codes per int32 along k, row 8r+i in bits 4i..4i+3;
  qzeros int32 [k/128, n/8] along n, storing zero-1 (the v1 convention; sym: 8-1 = 7);
  scales fp16 [k/128, n]; g_idx int32 [k] = row // 128 (no act-order). w = (q - 8) * s.
  gptq_marlin runs sym=True as uint4b8 and ignores qzeros.
AWQ (GEMM version, as AutoAWQ writes and vLLM's awq/awq_marlin read):
  qweight int32 [k, n/8] along n, nibble p holding column 8c + AWQ_ORDER[p];
  qzeros int32 [k/128, n/8] in the same order, scales fp16 [k/128, n]. w = (q - z) * s.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from dqprof.fullmodel.layout import GROUP, PACK

if sys.byteorder != "little":  # the int32 views below assume little-endian, as safetensors does
    raise ImportError("dqprof.fullmodel.packing needs a little-endian host")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's interleave (vllm quant_utils.awq_pack)
GPTQ_SYM_ZERO = 8  # uint4b8: codes are stored with a bias of 8


@dataclass
class Rtn:
    codes: torch.Tensor  # uint8 [n, k], 0..15
    scales: torch.Tensor  # fp16 [n, k / group]
    zeros: torch.Tensor  # uint8 [n, k / group], 0..15
    group: int = GROUP

    def dequantize(self) -> torch.Tensor:
        """fp32 [n, k]: (q - z) * s, the weight every kernel of this format computes with."""
        z = self.zeros.float().repeat_interleave(self.group, dim=1)
        s = self.scales.float().repeat_interleave(self.group, dim=1)
        return (self.codes.float() - z) * s


def _groups(weight: torch.Tensor, group: int) -> torch.Tensor:
    n, k = weight.shape
    if k % group:
        raise ValueError(f"k={k} is not a multiple of the group size {group}")
    return weight.float().reshape(n, k // group, group)


def _fp16_scale(x: torch.Tensor) -> torch.Tensor:
    # a floor keeps an all-zero group from dividing by zero; fp16 still represents it
    return x.clamp(min=1e-6).to(torch.float16)


def rtn_sym(weight: torch.Tensor, group: int = GROUP) -> Rtn:
    """GPTQ-style symmetric int4: s = 2 max|w| / 15, q = clamp(round(w / s) + 8, 0, 15)."""
    wg = _groups(weight, group)
    scale = _fp16_scale(wg.abs().amax(-1) * 2 / 15)
    q = (torch.round(wg / scale.float()[..., None]) + GPTQ_SYM_ZERO).clamp(0, 15)
    zeros = torch.full_like(scale, GPTQ_SYM_ZERO, dtype=torch.uint8)
    return Rtn(q.reshape(weight.shape).to(torch.uint8), scale, zeros, group)


def rtn_asym(weight: torch.Tensor, group: int = GROUP) -> Rtn:
    """AWQ-style asymmetric int4: s = (max - min) / 15, z = round(-min / s), q = round(w/s) + z."""
    wg = _groups(weight, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = _fp16_scale((hi - lo) / 15)
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(wg / s[..., None]) + zero[..., None]).clamp(0, 15)
    return Rtn(q.reshape(weight.shape).to(torch.uint8), scale, zero.to(torch.uint8), group)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 8] codes -> int32 [...], element i in bits 4i..4i+3.

    Two codes make a byte (even index low nibble) and four bytes a little-endian int32, so
    packing is a few uint8 passes and a reinterpreting view, not eight shifts in int64.
    """
    pairs = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    return pairs.view(torch.int32).squeeze(-1)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> uint8 [..., 8], the inverse of ``_pack``."""
    b = packed.contiguous().unsqueeze(-1).view(torch.uint8)  # [..., 4], low byte first
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*packed.shape, PACK)


def pack_gptq(r: Rtn) -> dict[str, torch.Tensor]:
    n, k = r.codes.shape
    qweight = _pack(r.codes.reshape(n, k // PACK, PACK)).t()  # rows 8j+i -> nibble i of row j
    zt = (r.zeros.t() - 1).contiguous()  # v1 convention: zero - 1, packed along n
    qzeros = _pack(zt.reshape(zt.shape[0], n // PACK, PACK))
    g_idx = torch.arange(k, dtype=torch.int32, device=r.codes.device) // r.group
    return {"qweight": qweight.contiguous(), "qzeros": qzeros.contiguous(),
            "scales": r.scales.t().contiguous(), "g_idx": g_idx}


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None = None) -> Rtn:
    k8, n = qweight.shape
    k = k8 * PACK
    codes = _unpack(qweight.t()).reshape(n, k)
    zeros = (_unpack(qzeros).reshape(qzeros.shape[0], n) + 1).t()
    group = k // scales.shape[0]
    if g_idx is not None and not torch.equal(
            g_idx.long(), torch.arange(k, device=g_idx.device) // group):
        raise ValueError("g_idx is not row // group: act-order checkpoints are not unpacked here")
    return Rtn(codes.contiguous(), scales.t().contiguous(), zeros.contiguous(), group)


def _pack_awq(x: torch.Tensor) -> torch.Tensor:
    """[rows, n] codes -> int32 [rows, n/8], nibble p holding column 8c + AWQ_ORDER[p]."""
    rows, n = x.shape
    return _pack(x.contiguous().reshape(rows, n // PACK, PACK)[..., list(AWQ_ORDER)])


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    inverse = [AWQ_ORDER.index(c) for c in range(PACK)]
    return _unpack(packed)[..., inverse].reshape(packed.shape[0], -1)


def pack_awq(r: Rtn) -> dict[str, torch.Tensor]:
    return {"qweight": _pack_awq(r.codes.t()).contiguous(),
            "qzeros": _pack_awq(r.zeros.t()).contiguous(),
            "scales": r.scales.t().contiguous()}


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> Rtn:
    k = qweight.shape[0]
    return Rtn(_unpack_awq(qweight).t().contiguous(), scales.t().contiguous(),
               _unpack_awq(qzeros).t().contiguous(), k // scales.shape[0])


def quantize_pack(weight: torch.Tensor, fmt: str) -> tuple[dict[str, torch.Tensor], Rtn]:
    """bf16 [n, k] -> (checkpoint tensors, the RTN result they encode)."""
    if fmt == "gptq":
        r = rtn_sym(weight)
        return pack_gptq(r), r
    if fmt == "awq":
        r = rtn_asym(weight)
        return pack_awq(r), r
    raise ValueError(f"no int4 packing for format '{fmt}'")
