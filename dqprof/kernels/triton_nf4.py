"""Our own fused NF4 GEMM in Triton: dequantize in registers, ``tl.dot`` on bf16 tiles.

What NF4 costs when dequantization is fused into the GEMM (as Marlin fuses int4), against
bitsandbytes' dequantize-then-GEMM fallback. One kernel computes ``y = x @ dequant(W).T``:
bf16 x and y, fp32 accumulation; the packed weight is read from HBM once.

Format: bitsandbytes' NF4 bytes unchanged -- the [n, k] weight flattened row-major, blocks of
64 consecutive k in one row (K % 64 == 0), two codes per byte, the first (even k) in the high
nibble -- so the kernel streams the same packed uint8 [n, k/2] that ``quantize_4bit`` writes,
k-contiguous: a tile row is BLOCK_K/2 contiguous bytes whatever BLOCK_N is, so narrow N tiles
stay sector-efficient. The statistics differ: one plain absmax per block, fp16 by default
(``absmax=fp32`` option), no nested double quantization (bitsandbytes' nested statistics cost
~1 byte per block; plain fp16 costs 2, i.e. 1/16 of the packed weight instead of 1/32).

Decode: the 16 levels are a 32-byte fp16 table (one L1 sector, so a warp's gather is one
wavefront); each nibble is one 16-bit gather, scaled by its block's absmax in fp32 and rounded
to bf16 as bitsandbytes' dequantize rounds its product (the levels themselves carry fp16's
2**-11 relative rounding, below bf16's 2**-9). The even/odd fp32 products are interleaved back
(``tl.join``) into the k-ordered tile the tensor cores multiply, then rounded (in that order:
triton 3.6 cannot compile the wgmma tiles otherwise, see the kernel); x is read as plain
[BLOCK_M, BLOCK_K] tiles through Triton's software pipeline (``num_stages``).

Why a 16-bit table and a hand-written prefetch: Triton's pipeliner sends every load of >= 32
bits per thread that feeds a dot through cp.async into shared memory; a 32- or 64-bit table
gather would be copied there too (several times the weight bytes in shared-memory traffic),
while a 16-bit gather is left alone -- but the pipeliner's search for loads then stops at the
gather and never reaches the packed-weight load behind it. So the kernel itself fetches the
next k-tile's weight bytes and absmax into registers one iteration ahead of the math.

Where the decode time goes (expected, not yet measured): per packed byte the SM issues two
table gathers and stages two bf16 weights through shared memory for the tensor cores (Triton
has no register path from a computed tile to an MMA operand), so L1/shared-memory wavefronts,
not HBM, should bound it below HBM bandwidth; Marlin avoids both with weights pre-shuffled
into MMA fragment order and register bit tricks. That gap is part of what this path shows.

Tiling, by M (``options`` 0 = this heuristic; any of them can be forced, e.g.
``triton-nf4[block_n=16,block_k=32]``); warps are chosen to keep ptxas (sm_90) from spilling
(tests/triton_compile_check.py --asm: with triton 3.6 the decode tiles take 165-168
registers per thread, so 3 CTAs of 4 warps or 1 of 8 warps per SM; the others <= 155):

* decode, M <= 16: memory-bound; one M tile of 16 rows, so every weight byte is read once.
  BLOCK_N 64 up to 8 rows, 128 beyond (every n-tile re-reads x from L2), BLOCK_K 128 (64-byte
  rows per n: whole sectors), 4 warps (8 for BLOCK_N 128). Split-K over k-tiles until there
  are ~3 CTAs per SM (N = 2560 has only 40 n-tiles of 64), each split keeping >= 4 k-tiles and
  all fp32 partials under a quarter of the weight bytes; a second small kernel adds the
  partials and writes bf16 (deterministic; no atomics, no memset).
* 16 < M <= 64: BLOCK_M 32/64, BLOCK_N 128, BLOCK_K 64, 8 warps; split-K to fill the GPU.
* M > 64: compute-bound prefill; BLOCK 128x128x64 (BLOCK_M 64 where 128 leaves SMs idle),
  8 warps, 3 stages, grouped tile order (GROUP_M 8) so neighbouring CTAs share weight tiles
  in L2; split-K (<= 4) only where the tiles still do not cover the SMs.

CUDA graphs: no host syncs; ``__call__`` allocates only the output (and, with split-K, the
fp32 workspace) with ``torch.empty``. Kernel names contain ``nf4_mm`` (attributed as gemm).
CPU tensors run in Triton's interpreter, only with ``TRITON_INTERPRET=1`` set before triton is
first imported (the tests do this in a subprocess).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from dqprof.bytemodel import Traffic, nf4_fused
from dqprof.kernels import register
from dqprof.kernels.base import Backend
from dqprof.kernels.nf4 import NF4_LEVELS, dequantize_nf4, quantize_nf4
from dqprof.models.shapes import LinearShape

BLOCKSIZE = 64  # NF4 block (bitsandbytes' default, what vLLM uses)
LUT_BYTES = 16 * 2  # the 16 NF4 levels in fp16
DEFAULT_SMS = 132  # H100/H200 SXM; used where no CUDA device answers (interpreter runs)
_ABSMAX_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}

# triton.language, bound by _kernels() on first use: no module here imports an optional
# package at import time, and the kernels below resolve ``tl`` through this module's globals.
tl: Any = None


# ---------------------------------------------------------------------------------------------
# Kernels (plain functions, wrapped by triton.jit in _kernels())
# ---------------------------------------------------------------------------------------------

def _nf4_mm_kernel(
    x_ptr, w_ptr, absmax_ptr, lut_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_an, stride_om, stride_on, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    """out[m, n] (+ split pid_k's slice of K) = x[m, :] . dequant(W)[n, :]."""
    HALF: tl.constexpr = BLOCK_K // 2  # packed bytes per n-row of a tile
    NBLK: tl.constexpr = (BLOCK_K + 63) // 64  # NF4 blocks per tile row (1 when BLOCK_K = 32)
    BPB: tl.constexpr = HALF // NBLK  # bytes of one tile row that share an absmax

    # Grouped ordering: GROUP_M consecutive M tiles walk the same weight column tiles, so a
    # weight tile is fetched from HBM once per group rather than once per M tile (large M).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    # This program's k-tiles: split pid_k of SPLIT_K (an empty range leaves zeros).
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_lo = pid_k * per_split
    kt_hi = tl.minimum(kt_lo + per_split, k_tiles)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, HALF)
    offs_s = tl.arange(0, NBLK)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # 64-bit row offsets: n * k / 2 passes 2**31 bytes for vocabulary-sized layers.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    a_rows = absmax_ptr + offs_n.to(tl.int64)[:, None] * stride_an

    # The first k-tile's weight bytes and absmax; each iteration then fetches the next tile's
    # into registers before its own math (see the module docstring: the pipeliner skips them).
    # (rows past N, or a whole tile past this split's range, are masked through the row bound)
    w_mask = (offs_n < tl.where(kt_lo < kt_hi, N, 0))[:, None]
    k_b = kt_lo * HALF + offs_b
    k_s = (kt_lo * BLOCK_K) // 64 + offs_s
    if EVEN_K:
        packed = tl.load(w_rows + k_b[None, :], mask=w_mask, other=0)
        absmax = tl.load(a_rows + k_s[None, :], mask=w_mask, other=0.0)
    else:  # the last k-tile runs past K (by whole 64-blocks, since K % 64 == 0)
        packed = tl.load(w_rows + k_b[None, :], mask=w_mask & (k_b < K // 2)[None, :], other=0)
        absmax = tl.load(a_rows + k_s[None, :], mask=w_mask & (k_s < K // 64)[None, :],
                         other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_lo, kt_hi):
        w_mask = (offs_n < tl.where(kt + 1 < kt_hi, N, 0))[:, None]
        k_b = (kt + 1) * HALF + offs_b
        k_s = ((kt + 1) * BLOCK_K) // 64 + offs_s
        k_x = kt * BLOCK_K + offs_k
        if EVEN_K:
            next_packed = tl.load(w_rows + k_b[None, :], mask=w_mask, other=0)
            next_absmax = tl.load(a_rows + k_s[None, :], mask=w_mask, other=0.0)
            x = tl.load(x_rows + k_x[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
        else:
            next_packed = tl.load(w_rows + k_b[None, :], mask=w_mask & (k_b < K // 2)[None, :],
                                  other=0)
            next_absmax = tl.load(a_rows + k_s[None, :],
                                  mask=w_mask & (k_s < K // 64)[None, :], other=0.0)
            x = tl.load(x_rows + k_x[None, :] * stride_xk,
                        mask=m_mask[:, None] & (k_x < K)[None, :], other=0.0)
        # Decode: high nibble = even k, low nibble = odd k; 16-bit gathers from the 32-byte
        # table. Masked bytes decode to -1 but meet a zero absmax.
        hi = tl.load(lut_ptr + (packed >> 4).to(tl.int32)).to(tl.float32)
        lo = tl.load(lut_ptr + (packed & 15).to(tl.int32)).to(tl.float32)
        scale = tl.reshape(tl.broadcast_to(absmax.to(tl.float32)[:, :, None],
                                           (BLOCK_N, NBLK, BPB)), (BLOCK_N, HALF))
        # Interleave the halves back into k order ([n, c, 2] -> [n, 2c + nibble]), then round
        # to bf16. The rounding must come after the reshape, not before: for a wgmma dot
        # (BLOCK_M >= 64 on sm_90) triton 3.6's optimize-dot-operands pass moves the operand's
        # shared-memory copy up through the trans, then (ReshapeMemDesc) through a reshape
        # right below it, onto the [n, c, 2] join, which has no legal NVMMA shared layout:
        # "Illegal shared layout", "PassManager::run failed". The same values either way.
        w = tl.reshape(tl.join(hi * scale, lo * scale), (BLOCK_N, BLOCK_K)).to(tl.bfloat16)
        acc = tl.dot(x, tl.trans(w), acc)  # w's [n, k] copy, k-contiguous; the trans is free
        packed = next_packed
        absmax = next_absmax

    out = (out_ptr + pid_k.to(tl.int64) * stride_os + offs_m.to(tl.int64)[:, None] * stride_om
           + offs_n[None, :] * stride_on)
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(tl.bfloat16), mask=mask)
    else:  # fp32 partial sums; _nf4_mm_splitk_reduce adds them
        tl.store(out, acc, mask=mask)


def _nf4_mm_splitk_reduce(ws_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """y[i] = bf16(sum_s ws[s, i]) over the flattened [m, n] output."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(tl.bfloat16), mask=mask)


@functools.cache
def _kernels() -> SimpleNamespace:
    """The jitted kernels (interpreted when TRITON_INTERPRET=1 was set before triton loaded)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return SimpleNamespace(mm=triton.jit(_nf4_mm_kernel),
                           reduce=triton.jit(_nf4_mm_splitk_reduce))


def _check_interpreter(device: torch.device) -> None:
    # Triton's own jitted helpers (tl.cdiv, ...) are interpreted only when the variable was set
    # before triton was first imported, so it cannot be switched on here.
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("triton-nf4 runs on CPU tensors only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


# ---------------------------------------------------------------------------------------------
# Tile configuration
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _largest_pow2_at_most(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _auto_split(tiles: int, k_tiles: int, target: int, min_iters: int, max_split: int) -> int:
    """Smallest split of the k-tiles (a divisor, so no split idles) with tiles * split >=
    target, each split keeping >= min_iters k-tiles; else the largest such split."""
    best = 1
    for s in range(1, min(max_split, k_tiles) + 1):
        if k_tiles % s or k_tiles // s < min_iters:
            continue
        best = s
        if tiles * s >= target:
            break
    return best


def tile_config(m: int, n: int, k: int, sms: int, opts: dict[str, Any]) -> TileConfig:
    """Block sizes, split-K and launch parameters for one call (options 0 = heuristic)."""
    m = max(m, 1)
    if m <= 16:  # decode: memory-bound, one pass over the packed weight
        bm, bk, stages = 16, 128, 4
        target, min_iters, max_split = 3 * sms, 4, 16
        # every n-tile re-reads x (from L2): past 8 rows, wider tiles halve that traffic
        bn = 128 if m > 8 or _cdiv(n, 128) >= target else 64
    elif m <= 64:  # small batches: still mostly bandwidth, larger M tiles reuse the weight
        bm, bn, bk, stages = (32 if m <= 32 else 64), 128, 64, 3
        target, min_iters, max_split = 2 * sms, 4, 8
    else:  # prefill: compute-bound, tensor-core sized tiles (64 rows if 128 leaves SMs idle)
        bm, bn, bk, stages = 128, 128, 64, 3
        if _cdiv(m, 128) * _cdiv(n, 128) < sms:
            bm = 64
        target, min_iters, max_split = sms, 8, 4
    if m <= 64:  # split-K's fp32 partials (written, read back) under a quarter of the weight
        max_split = min(max_split, max(1, k // (32 * m)))
    bm = opts.get("block_m") or bm
    bn = opts.get("block_n") or min(bn, max(16, 1 << (n - 1).bit_length()))
    bk = opts.get("block_k") or bk
    if not opts.get("block_k"):  # a BLOCK_K dividing K avoids the masked tail tile
        while k % bk and bk > 64:
            bk //= 2
    # 8 warps for the wide tiles keeps ptxas (sm_90) from spilling (<= 168 registers)
    warps = 8 if bn >= 128 or (bm >= 32 and bn >= 64) else 4
    k_tiles = _cdiv(k, bk)
    tiles = _cdiv(m, bm) * _cdiv(n, bn)
    split = opts.get("split_k") or _auto_split(tiles, k_tiles, target, min_iters, max_split)
    return TileConfig(bm, bn, bk, split, opts.get("num_warps") or warps,
                      opts.get("num_stages") or stages)


# ---------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------

def nf4_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels in fp16, as the kernel reads them (32 bytes: one L1 line)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float16, device=device)


@dataclass
class Nf4State:
    packed: torch.Tensor  # uint8 [n, k/2]: bitsandbytes' NF4 bytes
    absmax: torch.Tensor  # fp16 (or fp32) [n, k/64], one per block, not nested
    lut: torch.Tensor  # fp16 [16] NF4 levels, shared by clones
    n: int
    k: int


def _check_pow2(name: str, value: Any, low: int) -> None:
    if value == 0:
        return
    if not isinstance(value, int) or value < low or value & (value - 1):
        raise ValueError(f"triton-nf4 option {name}={value!r}: a power of two >= {low} (0: auto)")


@register
class TritonNf4(Backend):
    name = "triton-nf4"
    description = ("our fused Triton NF4 GEMM: bitsandbytes NF4 bytes, plain fp16 absmax per "
                   "64-block (no double quant), dequantized in registers into tl.dot")
    requires = ("triton",)
    devices = ("cuda",)
    options = {"block_m": 0, "block_n": 0, "block_k": 0, "split_k": 0, "num_warps": 0,
               "num_stages": 0, "absmax": "fp16"}

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.opts
        _check_pow2("block_m", o["block_m"], 16)
        _check_pow2("block_n", o["block_n"], 16)
        _check_pow2("block_k", o["block_k"], 32)
        _check_pow2("num_warps", o["num_warps"], 1)
        for key in ("split_k", "num_stages"):
            if not isinstance(o[key], int) or o[key] < 0:
                raise ValueError(f"triton-nf4 option {key}={o[key]!r}: an integer >= 0 (0: auto)")
        if o["absmax"] not in _ABSMAX_DTYPES:
            raise ValueError(f"triton-nf4 option absmax={o['absmax']!r}: one of "
                             f"{', '.join(_ABSMAX_DTYPES)}")

    def supports(self, shape: LinearShape) -> str | None:
        if reason := super().supports(shape):
            return reason
        if shape.k % BLOCKSIZE:  # NF4 blocks must not straddle rows; N and K tails are masked
            return f"triton-nf4 needs K % {BLOCKSIZE} == 0 (K={shape.k})"
        return None

    def prepare(self, weight: torch.Tensor, shape: LinearShape) -> Nf4State:
        n, k = weight.shape
        if k % BLOCKSIZE:
            raise ValueError(f"triton-nf4 needs K % {BLOCKSIZE} == 0 (K={k})")
        packed, absmax = [], []
        step = max(1, (1 << 22) // k)  # rows per chunk: bounds quantize_nf4's [numel, 16] temp
        for start in range(0, n, step):
            p, a = quantize_nf4(weight[start:start + step])
            packed.append(p)
            absmax.append(a)
        absmax_t = torch.cat(absmax).to(_ABSMAX_DTYPES[self.opts["absmax"]])
        if not torch.isfinite(absmax_t).all():
            raise ValueError(f"block absmax overflows {self.opts['absmax']}")
        return Nf4State(torch.cat(packed).view(n, k // 2), absmax_t.view(n, k // BLOCKSIZE),
                        nf4_table(weight.device), n, k)

    def config(self, m: int, n: int, k: int, device: torch.device) -> TileConfig:
        return tile_config(m, n, k, _sm_count(device), self.opts)

    def __call__(self, st: Nf4State, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)
        m, n, k = x.shape[0], st.n, st.k
        cfg = self.config(m, n, k, x.device)
        _check_interpreter(x.device)
        kern = _kernels()
        y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
        if m == 0:
            return y
        grid = (_cdiv(m, cfg.block_m) * _cdiv(n, cfg.block_n), cfg.split_k)
        out = y if cfg.split_k == 1 else torch.empty(cfg.split_k, m, n, dtype=torch.float32,
                                                     device=x.device)
        kern.mm[grid](
            x, st.packed, st.absmax, st.lut, out, m, n, k,
            x.stride(0), x.stride(1), st.packed.stride(0), st.absmax.stride(0),
            n, 1, m * n,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m, EVEN_K=k % cfg.block_k == 0,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if cfg.split_k > 1:
            block = 1024
            kern.reduce[(_cdiv(m * n, block),)](out, y, m * n, SPLIT_K=cfg.split_k,
                                                 BLOCK=block, num_warps=4)
        return y

    def reference(self, st: Nf4State) -> torch.Tensor:
        # our torch decoder, from the stored (fp16-rounded) absmax the kernel multiplies by
        return dequantize_nf4(st.packed, st.absmax.float().reshape(-1), (st.n, st.k), BLOCKSIZE)

    def clone(self, st: Nf4State) -> Nf4State:
        return Nf4State(st.packed.clone(), st.absmax.clone(), st.lut, st.n, st.k)

    def traffic(self, shape: LinearShape, m: int, kernels: list[dict] | None = None) -> Traffic:
        # the minimum: split-K's fp32 partials (mostly L2-resident) are not counted
        return nf4_fused(m, shape.n, shape.k, _ABSMAX_DTYPES[self.opts["absmax"]].itemsize,
                         LUT_BYTES)
