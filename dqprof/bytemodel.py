"""The byte and FLOP model: what each GEMM path must move through HBM, in one place.

Counts are the minimum each path's algorithm implies (every input read once, every output
written once), so achieved TB/s over this count is a lower bound on the real traffic rate.
Unfused paths also pay for the bf16 weight their dequantize kernel writes and the GEMM reads
back (``intermediate``): that term is the byte-side of the dequantization tax. The FP8 paths'
counterpart is the activation round trip: the quantize kernel writes fp8 activations and their
scales, and the GEMM reads them back (``intermediate`` too).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

BF16 = 2  # bytes per bf16 element
FP8 = 1  # bytes per float8_e4m3fn element
FP32 = 4
GROUP = 128  # int4 group size of the Marlin and tinygemm paths
GEMLITE_GROUP = 64  # gemlite-int4's group (HQQ's default for 4 bits)
NF4_BLOCK = 64  # bitsandbytes' 4-bit blocksize (its default, what vLLM uses)
NF4_NESTED_BLOCK = 256  # blocks of absmax per nested (double-quant) statistic


@dataclass(frozen=True)
class Traffic:
    weight: int = 0  # the stored weight as the kernel reads it (packed for 4-bit)
    scales: int = 0  # scales, zero points, absmax incl. nested statistics and code tables
    act_in: int = 0  # activations read (once per GEMM launch that reads them)
    act_out: int = 0  # results written, and any copy of them into a fused output
    # bf16 weight written by a dequantize kernel and read back, or the fp8 activations (and
    # their scales) an activation-quantize kernel writes and the GEMM reads back
    intermediate: int = 0

    @property
    def total(self) -> int:
        return self.weight + self.scales + self.act_in + self.act_out + self.intermediate

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


def astuple(t: Traffic) -> tuple[int, ...]:
    return (t.weight, t.scales, t.act_in, t.act_out, t.intermediate)


def gemm_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def bf16_gemm(m: int, n: int, k: int) -> Traffic:
    return Traffic(weight=BF16 * n * k, act_in=BF16 * m * k, act_out=BF16 * m * n)


def nf4_stats(n: int, k: int, nested: bool = True) -> int:
    """absmax bytes of one NF4 weight: uint8 + fp32 nested absmax + code tables, or fp32."""
    blocks = -(-n * k // NF4_BLOCK)
    if not nested:
        return 4 * blocks + 16 * 4
    nested_blocks = -(-blocks // NF4_NESTED_BLOCK)
    # uint8 absmax, fp32 nested absmax, fp32 offset, two 256-entry fp32 code tables
    return blocks + 4 * nested_blocks + 4 + 2 * 256 * 4


def nf4_dequantize(n: int, k: int) -> Traffic:
    """bitsandbytes' dequantize_4bit alone: read packed weight and stats (fp32 absmax: vLLM
    undoes the nesting at load), write bf16 weight."""
    return Traffic(weight=n * k // 2, scales=nf4_stats(n, k, nested=False),
                   intermediate=BF16 * n * k)


def bnb_nf4_shard(m: int, n: int, k: int, fused: bool) -> Traffic:
    """One matmul_4bit call: the fused gemm_4bit kernel, or dequantize then bf16 GEMM."""
    t = Traffic(weight=n * k // 2, scales=nf4_stats(n, k, nested=False), act_in=BF16 * m * k,
                act_out=BF16 * m * n)
    if not fused:  # the dequantized weight is written, then read by the GEMM
        t = Traffic(t.weight, t.scales, t.act_in, t.act_out, intermediate=2 * BF16 * n * k)
    return t


def bnb_nf4_layer(m: int, shards: tuple[int, ...], k: int, fused: bool) -> Traffic:
    """vLLM's path: one matmul_4bit per shard, each result copied into a fresh fused output."""
    total = Traffic()
    for n in shards:
        total = total + bnb_nf4_shard(m, n, k, fused)
    # out[:, a:b] = result, for every layer (one shard too): read each result, write it again
    return total + Traffic(act_out=2 * BF16 * m * sum(shards))


def int4_grouped(m: int, n: int, k: int, zero_points: str | None, group: int = GROUP) -> Traffic:
    """Fused int4 GEMM with bf16 scales per group (128 unless given); zero points packed int4 or
    bf16 per group."""
    groups = -(-k // group)
    scales = BF16 * groups * n
    if zero_points == "int4":  # Marlin AWQ: packed 4-bit zero points
        scales += groups * n // 2
    # tinygemm (interleaved), Machete AWQ and gemlite (-scale * zp): bf16 zeros
    elif zero_points == "bf16":
        scales += BF16 * groups * n
    return Traffic(weight=n * k // 2, scales=scales, act_in=BF16 * m * k, act_out=BF16 * m * n)


def nf4_fused(m: int, n: int, k: int, absmax_bytes: int = 2, table_bytes: int = 0) -> Traffic:
    """A fused NF4 GEMM (triton-nf4): packed weight, one plain absmax per block (no nesting)
    plus the kernel's code table, activations read once, results written once."""
    blocks = -(-n * k // NF4_BLOCK)
    return Traffic(weight=n * k // 2, scales=absmax_bytes * blocks + table_bytes,
                   act_in=BF16 * m * k, act_out=BF16 * m * n)


def fp8_w8a8(m: int, n: int, k: int, per_channel: bool) -> Traffic:
    """vLLM's W8A8 FP8 call: a per-token quantize kernel reads the bf16 activations and writes fp8
    ones with one fp32 scale per row; the scaled GEMM reads those, the fp8 weight and its fp32
    scale (one, or one per output channel) and writes bf16 results."""
    act_fp8 = FP8 * m * k + FP32 * m
    return Traffic(weight=FP8 * n * k, scales=FP32 * (n if per_channel else 1),
                   act_in=BF16 * m * k, act_out=BF16 * m * n, intermediate=2 * act_fp8)
