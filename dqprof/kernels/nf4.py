"""NF4 in plain torch: bitsandbytes' 4-bit NormalFloat format, written out independently.

Used as the reference the bitsandbytes and Triton NF4 paths are checked against, and by the
Triton kernel to pack weights. Layout (bitsandbytes): the [n, k] weight is flattened row-major,
cut into blocks of 64, each scaled by its absmax into [-1, 1] and rounded to the nearest of 16
NF4 levels; two codes per byte, the first in the high nibble. With nested statistics the fp32
absmax values are themselves shifted by their mean and 8-bit quantized in blocks of 256.
"""

from __future__ import annotations

import torch

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023), as bitsandbytes stores them.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_levels(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] float -> (packed uint8 [n*k/2], fp32 absmax [n*k/blocksize]), no nesting."""
    flat = weight.float().reshape(-1)
    if flat.numel() % blocksize or flat.numel() % 2:
        raise ValueError(f"{flat.numel()} elements do not fill blocks of {blocksize}")
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    levels = nf4_levels(weight.device)
    codes = (scaled.reshape(-1, 1) - levels).abs().argmin(dim=1).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def unpack_nf4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> int64 codes, high nibble first."""
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack(((p >> 4) & 0xF, p & 0xF), dim=1).reshape(-1)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int],
                   blocksize: int = 64) -> torch.Tensor:
    """Packed NF4 + fp32 absmax per block -> fp32 weight of ``shape``."""
    codes = unpack_nf4(packed)
    values = nf4_levels(packed.device)[codes].view(-1, blocksize) * absmax.float()[:, None]
    return values.reshape(shape)


def bnb_absmax(quant_state) -> torch.Tensor:
    """fp32 absmax per block from a bitsandbytes QuantState, undoing nested quantization."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    codes = s2.code.float()[quant_state.absmax.long()]
    scale = s2.absmax.float().repeat_interleave(s2.blocksize)[: codes.numel()]
    return codes * scale + quant_state.offset.float()


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``): the 256
    fp32 values its nested statistics index, written out independently."""
    exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(exponent_bits):
        items = 2 ** (i + non_sign_bits - exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(exponent_bits - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


def quantize_absmax_nested(absmax: torch.Tensor, blocksize: int = 256
                           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """fp32 absmax per NF4 block -> (uint8 codes, fp32 absmax per ``blocksize`` codes, offset),
    as bitsandbytes compresses statistics: subtract the mean, 8-bit quantize blockwise against
    the dynamic map (nearest value)."""
    offset = float(absmax.float().mean())
    centred = absmax.float().reshape(-1) - offset
    pad = (-centred.numel()) % blocksize
    blocks = torch.nn.functional.pad(centred, (0, pad)).view(-1, blocksize)
    scale = blocks.abs().amax(dim=1)
    normed = blocks / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    code = dynamic_map(absmax.device)
    q = torch.bucketize(normed.reshape(-1), (code[1:] + code[:-1]) / 2).to(torch.uint8)
    return q[: centred.numel()], scale, offset
