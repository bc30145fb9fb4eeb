"""Our own fused NF4 GEMM in Triton: bitsandbytes' NF4 bytes, dequantized in registers.

What NF4 costs when dequantization is fused into the GEMM (as Marlin fuses int4), against
bitsandbytes' path. ``y = x @ dequant(W).T`` with bf16 x and y and fp32 accumulation; the
packed weight is read from HBM once per call.

Format: exactly what ``bitsandbytes.functional.quantize_4bit(quant_type="nf4", blocksize=64)``
stores, unrepacked -- the [n, k] weight flattened row-major, blocks of 64 consecutive k (K % 64
== 0, so a block never straddles rows), two codes per byte with the even k in the high nibble.
The kernels read the packed bytes as int32 words [n, k/8] (16-byte loads, 8 weights a word).
Statistics, either form bitsandbytes writes:

* ``stats=nested`` (default; what vLLM's bitsandbytes path stores, ``compress_statistics``):
  one uint8 code per block into a 256-entry fp32 dynamic map, times an fp32 absmax per 256
  blocks, plus an fp32 offset -- 1 byte per 64 weights, 1/32 of the packed weight.
* ``stats=fp16`` / ``fp32``: one plain absmax per block (2 or 4 bytes per 64 weights).

Decode: a nibble indexes a 64-byte fp32 table of the 16 levels (one L1 line: a warp's gather
is one wavefront); the block's absmax is applied once per block to the partial dot product
(GEMV) or per weight before the MMA (tensor cores). No shared-memory round trip per nibble.

Three kernels, picked per call by M (``tile_config``; a tuned table per GPU in
``dqprof/kernels/configs/<gpu>.json`` overrides the heuristic, see ``tuned.py``):

* ``gemv`` (M <= 4, decode): CUDA cores, no tensor cores. Each program owns BLOCK_N rows and a
  k-range (split-K fills the SMs when N is small); per 8-weight word a thread does 8 nibble
  extracts, 8 table gathers and 8 * M FMAs against x held in registers (16-byte loads of the 8
  matching x values), fp32 accumulation, absmax per block. Bound by issue (int extract +
  gather per weight), not by HBM (see docs/triton-nf4.md for the measured figures). This is
  GEMV v3 (``decode=table``); ``decode=shfl`` / ``table4`` run GEMV v4 (``_nf4_gemv4_kernel``,
  M <= 4: one absmax per 32 weights, no layout conversion in the loop) with a warp-shuffle
  level lookup / v3's table gathers. The heuristic takes v4's ``shfl`` at M <= 4 (the H200
  tune, profiles/h200/session7: 1.3-2.1x faster than v3 on the four largest layers) and v3
  where a forced GEMV runs more rows than v4 holds.
* ``mma`` (any M): the transposed product ``y.T = W_deq @ x.T`` on tensor cores, so the
  decoded weight tile is the MMA's first operand, which Hopper's wgmma takes from registers
  (as Machete does): the decoded tile never goes back through shared memory; x.T is the
  shared-memory operand, fed by Triton's pipeliner. BLOCK_N (the MMA's M) is 64 per warpgroup,
  BLOCK_M (x rows, the MMA's N) 16 to 256.

* ``dequant`` (M >= DEQUANT_MIN_M: batched decode, prefill): ``_nf4_dequant_kernel`` writes
  the bf16 weight to a scratch (one decode per weight per call, memory-bound) and cuBLAS
  multiplies; the
  dequantize kernel is attributed as ``dequant``, the byte model counts the scratch's write
  and read. The NF4 format's cost there is then that kernel alone, which a fused kernel
  whose decode is not L1-bound would hide (not done: docs/triton-nf4.md).

Split-K writes fp32 partials that a small second kernel adds (deterministic; no atomics).
CUDA graphs: no host syncs; ``__call__`` allocates only the output (and the partials, or the
dequantize path's bf16 scratch). Kernel names contain ``nf4_`` (attributed as gemm;
``_nf4_dequant_kernel`` as dequant). CPU tensors run in Triton's interpreter, only with
``TRITON_INTERPRET=1`` set before triton is first imported (the tests do that).
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from typing import Any

import torch

from dqprof.bytemodel import Traffic, nf4_fused, nf4_stats
from dqprof.kernels import register
from dqprof.kernels.base import Backend
from dqprof.kernels.nf4 import (
    NF4_LEVELS,
    dequantize_nf4,
    dynamic_map,
    quantize_absmax_nested,
    quantize_nf4,
)
from dqprof.models.shapes import LinearShape

BLOCKSIZE = 64  # NF4 block (bitsandbytes' default, what vLLM uses)
NESTED_BLOCK = 256  # blocks of absmax per nested statistic (bitsandbytes' default)
LUT_BYTES = 16 * 4  # the 16 NF4 levels in fp32: one 64-byte L1 line
GEMV_MAX_M = 16  # the CUDA-core kernel: M FMAs per weight; tensor cores beyond
# From this M the heuristic dequantizes to a bf16 scratch and calls cuBLAS (kernel=dequant):
# the weight's decode is paid once per call instead of once per x tile, and cuBLAS' bf16 GEMM
# is near the tensor cores' peak where the MMA above is L1-bound. On the H200 (profiles/h200/
# session11) it took 1.05-1.30x bf16's time at M >= 1024 against the MMA's 5-8x, and at M = 32
# half the MMA's time on gate_up and down; at 16 it won on down, lost on gate_up (a tuned table
# picks per layer there). vLLM's AWQ path switches the same way at 256 tokens.
DEQUANT_MIN_M = GEMV_MAX_M + 1
DEQUANT_WORDS = 1024  # packed words per program of the dequantize kernel (8192 weights)
KERNELS = ("gemv", "mma", "dequant")
DEFAULT_SMS = 132  # H100/H200 SXM; used where no CUDA device answers (interpreter runs)
STATS = ("nested", "fp16", "fp32")
# the GEMV's decode: "table" is GEMV v3 (_nf4_gemv_kernel: L1 table gathers); GEMV v4
# (_nf4_gemv4_kernel) with L1 table gathers ("table4") or warp shuffles ("shfl"). See
# docs/triton-nf4.md for their SASS and times.
DECODES = ("table", "table4", "shfl", "shfl1", "direct")
# the MMA's: "table" (a gather per nibble from the L1 table; "table4" runs it too), "shfl" (v4's
# shuffle per word, its 8 levels joined back into k order), "shfl1" (one shuffle per nibble in
# the gather's own layout), "direct" (each weight loads its own word and absmax by PTX and is
# shuffle-decoded alone: elementwise from the loads to the dot, so the pipeliner does not stage
# the words through shared memory and the wgmma runs asynchronously; docs/triton-nf4.md).
# The GEMV runs "shfl" where an MMA-only decode is asked.
MMA_DECODE = {"table": 0, "table4": 0, "shfl": 1, "shfl1": 2, "direct": 3}
MMA_ONLY_DECODES = ("shfl1", "direct")
GEMV4_MAX_M = 4  # v4 holds one accumulator per row of x
AUTO_DECODE = "shfl"  # the heuristic's decode where v4 takes the rows (M <= GEMV4_MAX_M)
_PLAIN_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}

# triton.language, bound by _kernels() on first use: no module here imports an optional
# package at import time, and the kernels below resolve ``tl`` through this module's globals.
tl: Any = None
_DECODE8: Any = None  # the PTX below, as tl.constexpr (bound with tl; see PTX)
_LOAD_X8: Any = None
_SHFL8: Any = None
_SHFL1: Any = None
_ABSMAX_NESTED: Any = None
_ABSMAX_FP16: Any = None
_ABSMAX_FP32: Any = None
_LOAD_W: Any = None


# ---------------------------------------------------------------------------------------------
# Kernels (plain functions, wrapped by triton.jit in _kernels())
# ---------------------------------------------------------------------------------------------

def _nf4_absmax(a_ptr, a2_ptr, code2_ptr, offset, flat, mask, NESTED: tl.constexpr):
    """fp32 absmax of the blocks at ``flat`` (row * K/64 + block), either statistics form."""
    if NESTED:
        q = tl.load(a_ptr + flat, mask=mask, other=0).to(tl.int32)
        scale = tl.load(a2_ptr + flat // 256, mask=mask, other=0.0)
        return tl.load(code2_ptr + q) * scale + offset
    else:
        return tl.load(a_ptr + flat, mask=mask, other=0.0).to(tl.float32)


def _nf4_absmax_rows(a_ptr, a2_ptr, code2_ptr, offset, flat, NESTED: tl.constexpr,
                     ASM: tl.constexpr):
    """_nf4_absmax without a mask (``flat`` always in bounds). On the GPU as PTX loads: a
    tl.load is an anchor whose layout Triton picks from the pointer alone, and it picked rows
    across the threads, which cost a layout conversion through shared memory per k-tile."""
    if NESTED:
        if ASM:
            return tl.inline_asm_elementwise(_ABSMAX_NESTED, "=r,l,l,l,r",
                                             [(a_ptr + flat).to(tl.int64),
                                              code2_ptr.to(tl.int64),
                                              (a2_ptr + flat // 256).to(tl.int64), offset],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            q = tl.load(a_ptr + flat).to(tl.int32)
            return tl.load(code2_ptr + q) * tl.load(a2_ptr + flat // 256) + offset
    else:
        if ASM:
            if a_ptr.dtype.element_ty == tl.float16:
                return tl.inline_asm_elementwise(_ABSMAX_FP16, "=r,l", [a_ptr + flat],
                                                 dtype=tl.float32, is_pure=True, pack=1)
            else:
                return tl.inline_asm_elementwise(_ABSMAX_FP32, "=r,l", [a_ptr + flat],
                                                 dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.load(a_ptr + flat).to(tl.float32)


def _nf4_levels(lut_ptr, codes, ASM: tl.constexpr):
    """The fp32 levels of ``codes``: a gather from the 64-byte table (L1-resident). On the GPU
    an opaque ld.global.nc, because Triton's pipeliner would otherwise copy every gathered
    32-bit value through shared memory (cp.async) for the MMA; the interpreter runs tl.load."""
    if ASM:
        return tl.inline_asm_elementwise("ld.global.nc.L1::evict_last.f32 $0, [$1];", "=r,l",
                                         [lut_ptr + codes], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.load(lut_ptr + codes)


# One word's 8 levels in k order (nibble j = k 8w + j: byte j // 2, high nibble for even j).
# The table is 64-byte aligned, so a level's address is the table's with code * 4 OR-ed into
# its low word: per weight one shift and one LOP3 (mask + or), then an L1 load ($9, $10: the
# table address's low and high words).
_DECODE8_PTX = "\n".join(
    ["{", ".reg .b32 c<8>;", ".reg .b64 a<8>;"]
    + [f"{op} c{j}, $8, {sh}; and.b32 c{j}, c{j}, 60; or.b32 c{j}, c{j}, $9;"
       f" mov.b64 a{j}, {{c{j}, $10}}; ld.global.nc.L1::evict_last.f32 ${j}, [a{j}];"
       for j, (op, sh) in enumerate(
           [("shr.u32", 2), ("shl.b32", 2), ("shr.u32", 10), ("shr.u32", 6), ("shr.u32", 18),
            ("shr.u32", 14), ("shr.u32", 26), ("shr.u32", 22)])]
    + ["}"])


# 8 consecutive bf16 of x (one 16-byte load) as 8 fp32 (bf16 is fp32's upper half)
_LOAD_X8_PTX = "\n".join(
    ["{", ".reg .b32 r<4>;", "ld.global.nc.v4.b32 {r0, r1, r2, r3}, [$8];"]
    + [f"shl.b32 ${2 * i}, r{i}, 16; and.b32 ${2 * i + 1}, r{i}, 0xffff0000;" for i in range(4)]
    + ["}"])


def _nf4_load_x8(ptrs, ASM: tl.constexpr):
    """x[ptrs + j] for j < 8 as 8 fp32 tensors (``ptrs`` 16-byte aligned)."""
    if ASM:
        return tl.inline_asm_elementwise(_LOAD_X8, "=r,=r,=r,=r,=r,=r,=r,=r,l", [ptrs],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        return (tl.load(ptrs).to(tl.float32), tl.load(ptrs + 1).to(tl.float32),
                tl.load(ptrs + 2).to(tl.float32), tl.load(ptrs + 3).to(tl.float32),
                tl.load(ptrs + 4).to(tl.float32), tl.load(ptrs + 5).to(tl.float32),
                tl.load(ptrs + 6).to(tl.float32), tl.load(ptrs + 7).to(tl.float32))


def _nf4_word_dot(v0, v1, v2, v3, v4, v5, v6, v7, xr, ASM: tl.constexpr):
    """sum_j v_j * x_j per word, x_j broadcast over the rows."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _nf4_load_x8(xr, ASM)
    # one FMUL and seven FFMAs (a + b pairs would compile to FMUL + FFMA + FADD)
    s = v0 * x0[None, :]
    s = tl.fma(v1, x1[None, :], s)
    s = tl.fma(v2, x2[None, :], s)
    s = tl.fma(v3, x3[None, :], s)
    s = tl.fma(v4, x4[None, :], s)
    s = tl.fma(v5, x5[None, :], s)
    s = tl.fma(v6, x6[None, :], s)
    return tl.fma(v7, x7[None, :], s)


def _nf4_decode8(words, lut_ptr, lut_lo, lut_hi, ASM: tl.constexpr):
    """8 tensors shaped like ``words``: the fp32 level of nibble j of each word."""
    if ASM:
        zero = words * 0
        return tl.inline_asm_elementwise(_DECODE8, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r",
                                         [words, zero + lut_lo, zero + lut_hi],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        return (tl.load(lut_ptr + ((words >> 4) & 15)), tl.load(lut_ptr + (words & 15)),
                tl.load(lut_ptr + ((words >> 12) & 15)), tl.load(lut_ptr + ((words >> 8) & 15)),
                tl.load(lut_ptr + ((words >> 20) & 15)), tl.load(lut_ptr + ((words >> 16) & 15)),
                tl.load(lut_ptr + ((words >> 28) & 15)), tl.load(lut_ptr + ((words >> 24) & 15)))


# GEMV v4, the shuffle decode: lane l of every warp holds level[l % 16] in one register (t),
# and a nibble's level is shfl.sync.idx from lane (word >> shift): shfl reads only the index's
# low 5 bits, and lanes l and l + 16 hold the same level, so the next nibble's bit there is
# harmless. Per weight one shift (none for bits 0-3) and one SHFL: no address, no shared
# memory. t is loaded in the same PTX as the shuffles, so it is always the executing lane's
# own (a value Triton held as a tensor could be moved between threads); ptxas hoists the
# load out of the loop and shares it between all the decodes ($8 the word, $9 and $10 the
# table address's low and high words; the table is 64-byte aligned).
_SHFL8_PTX = "\n".join(
    ["{", ".reg .b32 i<8>, l; .reg .b64 a; .reg .f32 t;",
     "mov.u32 l, %laneid; and.b32 l, l, 15; shl.b32 l, l, 2; or.b32 l, l, $9;",
     "mov.b64 a, {l, $10}; ld.global.nc.f32 t, [a];"]
    + [(f"shr.u32 i{j}, $8, {sh};" if sh else f"mov.b32 i{j}, $8;")
       + f" shfl.sync.idx.b32 ${j}, t, i{j}, 31, -1;"
       for j, sh in enumerate((4, 0, 12, 8, 20, 16, 28, 24))]
    + ["}"])
# a block's fp32 absmax: nested (code at $1 into the map at $2, times the fp32 at $3, plus the
# offset $4), or plain fp16 / fp32 at $1. Rounded as bitsandbytes rounds it (the product, then
# the sum: .rn keeps ptxas from fusing them)
_ABSMAX_NESTED_PTX = ("{ .reg .b32 q; .reg .b64 p; .reg .f32 c, s; ld.global.nc.u8 q, [$1];"
                      " mul.wide.u32 p, q, 4; add.s64 p, p, $2; ld.global.nc.f32 c, [p];"
                      " ld.global.nc.f32 s, [$3]; mul.rn.f32 c, c, s; add.rn.f32 $0, c, $4; }")
_ABSMAX_FP16_PTX = "{ .reg .b16 h; ld.global.nc.b16 h, [$1]; cvt.f32.f16 $0, h; }"
_ABSMAX_FP32_PTX = "ld.global.nc.f32 $0, [$1];"
_LOAD_W_PTX = "ld.global.nc.b32 $0, [$1];"  # one packed word (decode=direct)


def _nf4_decode8_v4(words, lut_ptr, lut_lo, lut_hi, SHFL: tl.constexpr, ASM: tl.constexpr):
    """_nf4_decode8, by warp shuffle (SHFL) or by the L1 table; the interpreter loads the
    table either way (the same fp32 levels: the arithmetic after the decode is the same)."""
    if ASM and SHFL:
        zero = words * 0
        return tl.inline_asm_elementwise(_SHFL8, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r",
                                         [words, zero + lut_lo, zero + lut_hi],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        return _nf4_decode8(words, lut_ptr, lut_lo, lut_hi, ASM)


def _nf4_word_fma(v0, v1, v2, v3, v4, v5, v6, v7, xr, s, ASM: tl.constexpr):
    """s + sum_j v_j * x_j (8 FFMAs in k order), x_j broadcast over the rows."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _nf4_load_x8(xr, ASM)
    s = tl.fma(v0, x0[None, :], s)
    s = tl.fma(v1, x1[None, :], s)
    s = tl.fma(v2, x2[None, :], s)
    s = tl.fma(v3, x3[None, :], s)
    s = tl.fma(v4, x4[None, :], s)
    s = tl.fma(v5, x5[None, :], s)
    s = tl.fma(v6, x6[None, :], s)
    return tl.fma(v7, x7[None, :], s)


def _nf4_word_rows(w, xk, stride_xm, M, s0, s1, s2, s3, lut_ptr, lut_lo, lut_hi,
                   BLOCK_M: tl.constexpr, SHFL: tl.constexpr, ASM: tl.constexpr):
    """One word's 8 levels (decoded once) into the group sums of up to 4 rows of x (rows past
    M read row 0, in bounds; their sums are not stored)."""
    v0, v1, v2, v3, v4, v5, v6, v7 = _nf4_decode8_v4(w, lut_ptr, lut_lo, lut_hi, SHFL, ASM)
    s0 = _nf4_word_fma(v0, v1, v2, v3, v4, v5, v6, v7, xk, s0, ASM)
    if BLOCK_M >= 2:
        s1 = _nf4_word_fma(v0, v1, v2, v3, v4, v5, v6, v7, tl.where(1 < M, xk + stride_xm, xk),
                           s1, ASM)
    if BLOCK_M >= 4:
        s2 = _nf4_word_fma(v0, v1, v2, v3, v4, v5, v6, v7,
                           tl.where(2 < M, xk + 2 * stride_xm, xk), s2, ASM)
        s3 = _nf4_word_fma(v0, v1, v2, v3, v4, v5, v6, v7,
                           tl.where(3 < M, xk + 3 * stride_xm, xk), s3, ASM)
    return s0, s1, s2, s3


def _nf4_gemv4_kernel(
    x_ptr, w_ptr, a_ptr, a2_ptr, code2_ptr, lut_ptr, out_ptr,
    M, N, K, kw, kb, offset, stride_xm, stride_om, stride_os, lut_lo, lut_hi, R,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, NESTED: tl.constexpr, SHFL: tl.constexpr, ASM: tl.constexpr,
):
    """GEMV v4 (BLOCK_M <= 4 rows of x a program): _nf4_gemv_kernel's product over
    [BLOCK_N, groups] tensors, a group being 4 consecutive words of a row (32 weights, one
    16-byte load, half an NF4 block). M > BLOCK_M runs R = cdiv(M, BLOCK_M) row groups, the
    programs of one weight tile adjacent in the grid, so the weight comes from HBM once and
    from L2 for the other groups (each group decodes it again).

    The words' tl.load is the one anchor in the loop: its 16-byte layout puts a row's groups
    across the threads of a warp and several rows in each thread's registers, and splitting
    the loaded [BLOCK_N, words] into each group's 4 words moves no data. Per group: one absmax
    (v3 decoded one per word) from PTX loads (a tl.load there was an anchor of its own, and
    cost a shared-memory layout conversion per k-tile), one FMA chain over its 32 weights per
    row of x and one FMA into that row's accumulator; the group's 32 x values are loaded and
    widened once for all the rows a thread holds. Rows past N are clamped to N - 1 (in bounds,
    never stored) instead of masked. No branch in the loop: every lane runs every shuffle."""
    G: tl.constexpr = BLOCK_K // 32
    pid_n = tl.program_id(0) // R
    pid_r = tl.program_id(0) % R  # this program's rows of x: pid_r * BLOCK_M onwards
    pid_k = tl.program_id(1)
    x_ptr += pid_r * BLOCK_M * stride_xm
    out_ptr += (pid_r * BLOCK_M).to(tl.int64) * stride_om
    M -= pid_r * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, G)
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_m = tl.arange(0, BLOCK_M)
    k_tiles = K // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_lo = pid_k * per_split
    kt_hi = tl.minimum(kt_lo + per_split, k_tiles)
    rows = tl.minimum(offs_n, N - 1)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * kw
    a_rows = rows[:, None] * kb  # int32: the host checks N * K / 64 < 2**31

    r0 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    r1 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    r2 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    r3 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    for kt in range(kt_lo, kt_hi):
        words = tl.load(w_rows + (kt * (BLOCK_K // 8) + offs_w)[None, :])
        # [rows, 4 g + 2 a + b] -> [rows, g, a, b]; split takes the last axis (b) first
        w_even, w_odd = tl.split(tl.reshape(words, (BLOCK_N, G, 2, 2)))
        w0, w2 = tl.split(w_even)
        w1, w3 = tl.split(w_odd)
        xk = x_ptr + kt * BLOCK_K + offs_g * 32
        s0 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
        s1 = s0
        s2 = s0
        s3 = s0
        s0, s1, s2, s3 = _nf4_word_rows(w0, xk, stride_xm, M, s0, s1, s2, s3, lut_ptr, lut_lo,
                                        lut_hi, BLOCK_M, SHFL, ASM)
        s0, s1, s2, s3 = _nf4_word_rows(w1, xk + 8, stride_xm, M, s0, s1, s2, s3, lut_ptr,
                                        lut_lo, lut_hi, BLOCK_M, SHFL, ASM)
        s0, s1, s2, s3 = _nf4_word_rows(w2, xk + 16, stride_xm, M, s0, s1, s2, s3, lut_ptr,
                                        lut_lo, lut_hi, BLOCK_M, SHFL, ASM)
        s0, s1, s2, s3 = _nf4_word_rows(w3, xk + 24, stride_xm, M, s0, s1, s2, s3, lut_ptr,
                                        lut_lo, lut_hi, BLOCK_M, SHFL, ASM)
        blk = (kt * BLOCK_K + offs_g * 32) // 64
        a_g = _nf4_absmax_rows(a_ptr, a2_ptr, code2_ptr, offset, a_rows + blk[None, :], NESTED,
                               ASM)
        r0 = tl.fma(s0, a_g, r0)
        if BLOCK_M >= 2:
            r1 = tl.fma(s1, a_g, r1)
        if BLOCK_M >= 4:
            r2 = tl.fma(s2, a_g, r2)
            r3 = tl.fma(s3, a_g, r3)

    acc = tl.where(offs_m[None, :] == 0, tl.sum(r0, axis=1)[:, None], 0.0)
    if BLOCK_M >= 2:
        acc += tl.where(offs_m[None, :] == 1, tl.sum(r1, axis=1)[:, None], 0.0)
    if BLOCK_M >= 4:
        acc += tl.where(offs_m[None, :] == 2, tl.sum(r2, axis=1)[:, None], 0.0)
        acc += tl.where(offs_m[None, :] == 3, tl.sum(r3, axis=1)[:, None], 0.0)
    out = (out_ptr + pid_k.to(tl.int64) * stride_os + offs_m.to(tl.int64)[None, :] * stride_om
           + offs_n[:, None])
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    if SPLIT_K == 1:
        tl.store(out, acc.to(tl.bfloat16), mask=mask)
    else:
        tl.store(out, acc, mask=mask)


def _nf4_gemv_kernel(
    x_ptr, w_ptr, a_ptr, a2_ptr, code2_ptr, lut_ptr, out_ptr,
    M, N, K, kw, kb, offset, stride_xm, stride_om, stride_os, lut_lo, lut_hi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, NESTED: tl.constexpr, ASM: tl.constexpr,
):
    """out[m, n] (+ split pid_k's slice of K) = x[m, :] . dequant(W)[n, :] on CUDA cores.

    Every tensor is [BLOCK_N, words] or a slice of it, in the words' (coalesced, 16-byte)
    layout, so nothing changes layout inside the loop: a thread decodes its own words, reads
    the 8 matching x values per row from L1 (shared by the rows it holds), and a row's partial
    sum is reduced across the threads of its k-range once per k-tile."""
    WPT: tl.constexpr = BLOCK_K // 8  # int32 words per row of a k-tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, WPT)
    offs_m = tl.arange(0, BLOCK_M)
    k_tiles = K // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_lo = pid_k * per_split
    kt_hi = tl.minimum(kt_lo + per_split, k_tiles)
    rows = offs_n.to(tl.int64)
    w_rows = w_ptr + rows[:, None] * kw
    a_rows = rows[:, None] * kb

    # M <= 4: one [BLOCK_N, words] accumulator per row of x, reduced once after the loop (no
    # cross-thread reduction inside it); larger M reduce each k-tile (registers would not hold
    # M such accumulators)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    r0 = tl.zeros((BLOCK_N, WPT), dtype=tl.float32)
    r1 = tl.zeros((BLOCK_N, WPT), dtype=tl.float32)
    r2 = tl.zeros((BLOCK_N, WPT), dtype=tl.float32)
    r3 = tl.zeros((BLOCK_N, WPT), dtype=tl.float32)
    for kt in range(kt_lo, kt_hi):
        words = tl.load(w_rows + (kt * WPT + offs_w)[None, :], mask=n_mask[:, None], other=0)
        v0, v1, v2, v3, v4, v5, v6, v7 = _nf4_decode8(words, lut_ptr, lut_lo, lut_hi, ASM)
        blk = (kt * BLOCK_K + offs_w * 8) // 64
        a_w = _nf4_absmax(a_ptr, a2_ptr, code2_ptr, offset, a_rows + blk[None, :],
                          n_mask[:, None], NESTED)
        xk = x_ptr + kt * BLOCK_K + offs_w * 8
        if BLOCK_M <= 4:
            r0 += _nf4_word_dot(v0, v1, v2, v3, v4, v5, v6, v7, xk, ASM) * a_w
            if BLOCK_M >= 2:  # rows past M read row 0 (in bounds); their sums are not stored
                xr = tl.where(offs_w * 0 + 1 < M, xk + stride_xm, xk)
                r1 += _nf4_word_dot(v0, v1, v2, v3, v4, v5, v6, v7, xr, ASM) * a_w
            if BLOCK_M == 4:
                xr = tl.where(offs_w * 0 + 2 < M, xk + 2 * stride_xm, xk)
                r2 += _nf4_word_dot(v0, v1, v2, v3, v4, v5, v6, v7, xr, ASM) * a_w
                xr = tl.where(offs_w * 0 + 3 < M, xk + 3 * stride_xm, xk)
                r3 += _nf4_word_dot(v0, v1, v2, v3, v4, v5, v6, v7, xr, ASM) * a_w
        else:
            for mi in tl.static_range(BLOCK_M):
                xr = tl.where(offs_w * 0 + mi < M, xk + mi * stride_xm, xk)
                s = _nf4_word_dot(v0, v1, v2, v3, v4, v5, v6, v7, xr, ASM)
                part = tl.sum(s * a_w, axis=1)
                acc += tl.where(offs_m[None, :] == mi, part[:, None], 0.0)
    if BLOCK_M <= 4:
        acc += tl.where(offs_m[None, :] == 0, tl.sum(r0, axis=1)[:, None], 0.0)
        if BLOCK_M >= 2:
            acc += tl.where(offs_m[None, :] == 1, tl.sum(r1, axis=1)[:, None], 0.0)
        if BLOCK_M == 4:
            acc += tl.where(offs_m[None, :] == 2, tl.sum(r2, axis=1)[:, None], 0.0)
            acc += tl.where(offs_m[None, :] == 3, tl.sum(r3, axis=1)[:, None], 0.0)

    out = (out_ptr + pid_k.to(tl.int64) * stride_os + offs_m.to(tl.int64)[None, :] * stride_om
           + offs_n[:, None])
    mask = n_mask[:, None] & (offs_m[None, :] < M)
    if SPLIT_K == 1:
        tl.store(out, acc.to(tl.bfloat16), mask=mask)
    else:  # fp32 partial sums; _nf4_splitk_reduce adds them
        tl.store(out, acc, mask=mask)


def _nf4_levels_shfl(lut_ptr, codes, lut_lo, lut_hi, ASM: tl.constexpr):
    """_nf4_levels by one warp shuffle per code (the lane's own level loaded in the same PTX,
    which ptxas hoists out of the loop); the interpreter loads the table."""
    if ASM:
        zero = codes * 0
        return tl.inline_asm_elementwise(_SHFL1, "=r,r,r,r", [codes, zero + lut_lo,
                                                              zero + lut_hi],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.load(lut_ptr + codes)


def _nf4_load_words(ptrs, ASM: tl.constexpr):
    """The packed word at each pointer; on the GPU by PTX, which Triton's pipeliner leaves in
    registers (a tl.load there is staged through shared memory with the x tile)."""
    if ASM:
        return tl.inline_asm_elementwise(_LOAD_W, "=r,l", [ptrs], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return tl.load(ptrs)


def _nf4_tile_shfl(words, a_w, lut_ptr, lut_lo, lut_hi, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_N, BLOCK_K] bf16 weights from [BLOCK_N, words] by the shuffle decode: each join
    adds a last axis, so joining (v0, v4), (v2, v6) ... puts level j at 4 (j // 4) +
    2 ((j // 2) % 2) + j % 2 = j of its word's 8."""
    v0, v1, v2, v3, v4, v5, v6, v7 = _nf4_decode8_v4(words, lut_ptr, lut_lo, lut_hi, True, ASM)
    v0 = (v0 * a_w).to(tl.bfloat16)
    v1 = (v1 * a_w).to(tl.bfloat16)
    v2 = (v2 * a_w).to(tl.bfloat16)
    v3 = (v3 * a_w).to(tl.bfloat16)
    v4 = (v4 * a_w).to(tl.bfloat16)
    v5 = (v5 * a_w).to(tl.bfloat16)
    v6 = (v6 * a_w).to(tl.bfloat16)
    v7 = (v7 * a_w).to(tl.bfloat16)
    even = tl.join(tl.join(v0, v4), tl.join(v2, v6))
    odd = tl.join(tl.join(v1, v5), tl.join(v3, v7))
    return tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))


def _nf4_mma_kernel(
    x_ptr, w_ptr, a_ptr, a2_ptr, code2_ptr, lut_ptr, out_ptr,
    M, N, K, kw, kb, offset, stride_xm, stride_om, stride_os, lut_lo, lut_hi,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_N: tl.constexpr, NESTED: tl.constexpr,
    SHFL: tl.constexpr, ASM: tl.constexpr,
):
    """out[m, n] (+ split pid_k's slice) via acc[n, m] = dequant(W)[n, :] @ x[m, :].T.

    The decode (SHFL, MMA_DECODE): 0 a gather per nibble from the L1 table; 1 GEMV v4's warp
    shuffle per word, its 8 levels joined back into k order; 2 a shuffle per nibble in the
    gather's layout. sm_90 SASS with triton 3.6, loop instructions and barriers per k-tile of
    the prefill tile (128x128x64, 8 warps): 567 / 3, 327 / 9, 509 / 3; of the M = 16 tile
    (16x64x128, 4 warps): 1059 / 5, 596 / 17, 912 / 5. Which is fastest is the GPU's to say
    (`dqprof tune` times all three); the gather stays the default until it has."""
    WPT: tl.constexpr = BLOCK_K // 8
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    # Grouped order: GROUP_N consecutive weight tiles walk the same x tiles, so a weight tile
    # is fetched from HBM once per group of x tiles rather than once per x tile (large M).
    width = GROUP_N * num_m
    first_n = (pid // width) * GROUP_N
    size_n = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % size_n
    pid_m = (pid % width) // size_n

    k_tiles = K // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_lo = pid_k * per_split
    kt_hi = tl.minimum(kt_lo + per_split, k_tiles)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, WPT)
    offs_j = tl.arange(0, 8)
    offs_k = tl.arange(0, BLOCK_K)
    shifts = (offs_j // 2) * 8 + (1 - offs_j % 2) * 4
    n_mask = offs_n < N
    m_mask = offs_m < M
    rows = offs_n.to(tl.int64)
    w_rows = w_ptr + rows[:, None] * kw
    a_rows = rows[:, None] * kb
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm  # [1, BLOCK_M]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if SHFL == 3:  # rows past N clamped (unmasked loads; their outputs are not stored)
        k_shift = ((offs_k % 8) // 2) * 8 + (1 - offs_k % 2) * 4
        rows_c = tl.minimum(offs_n, N - 1).to(tl.int64)
        w_rows_c = w_ptr + rows_c[:, None] * kw
        a_rows_c = rows_c[:, None] * kb
    for kt in range(kt_lo, kt_hi):
        if SHFL == 3:
            kk = kt * BLOCK_K + offs_k
            word = _nf4_load_words(w_rows_c + (kk // 8)[None, :], ASM)
            a_k = _nf4_absmax_rows(a_ptr, a2_ptr, code2_ptr, offset,
                                   a_rows_c + (kk // 64)[None, :], NESTED, ASM)
            xt = tl.load(x_cols + kk[:, None], mask=m_mask[None, :], other=0.0)
            v = _nf4_levels_shfl(lut_ptr, (word >> k_shift[None, :]) & 15, lut_lo, lut_hi, ASM)
            w = (v * a_k).to(tl.bfloat16)
        else:
            words = tl.load(w_rows + (kt * WPT + offs_w)[None, :], mask=n_mask[:, None],
                            other=0)
            blk = (kt * BLOCK_K + offs_w * 8) // 64
            a_w = _nf4_absmax(a_ptr, a2_ptr, code2_ptr, offset, a_rows + blk[None, :],
                              n_mask[:, None], NESTED)
            xt = tl.load(x_cols + (kt * BLOCK_K + offs_k)[:, None], mask=m_mask[None, :],
                         other=0.0)  # [BLOCK_K, BLOCK_M]
            if SHFL == 1:
                w = _nf4_tile_shfl(words, a_w, lut_ptr, lut_lo, lut_hi, BLOCK_N, BLOCK_K, ASM)
            else:
                codes = (words[:, :, None] >> shifts[None, None, :]) & 15
                if SHFL == 2:
                    v = _nf4_levels_shfl(lut_ptr, codes, lut_lo, lut_hi, ASM)
                else:
                    v = _nf4_levels(lut_ptr, codes, ASM)
                w = tl.reshape(v * a_w[:, :, None], (BLOCK_N, BLOCK_K)).to(tl.bfloat16)
        acc = tl.dot(w, xt, acc)

    out = (out_ptr + pid_k.to(tl.int64) * stride_os + offs_m.to(tl.int64)[None, :] * stride_om
           + offs_n[:, None])
    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(tl.bfloat16), mask=mask)
    else:
        tl.store(out, acc, mask=mask)


def _nf4_dequant_kernel(w_ptr, a_ptr, a2_ptr, code2_ptr, lut_ptr, out_ptr, WORDS, offset,
                        NESTED: tl.constexpr, BLOCK: tl.constexpr):
    """out [n, k] bf16 = dequant(W): BLOCK packed words a program (8 weights each, 8 words a
    block of 64), 8 bf16 stored per word. Memory-bound: 2.5 bytes and a gather from the
    L1-resident table per weight, no MMA (3.7-3.9 TB/s on the H200: docs/triton-nf4.md)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < WORDS
    words = tl.load(w_ptr + offs, mask=mask, other=0)
    absmax = _nf4_absmax(a_ptr, a2_ptr, code2_ptr, offset, offs // 8, mask, NESTED)
    offs_j = tl.arange(0, 8)
    shifts = (offs_j // 2) * 8 + (1 - offs_j % 2) * 4  # the even k in a byte's high nibble
    codes = (words[:, None] >> shifts[None, :]) & 15
    w = tl.load(lut_ptr + codes) * absmax[:, None]
    tl.store(out_ptr + offs[:, None] * 8 + offs_j[None, :], w.to(tl.bfloat16),
             mask=mask[:, None])


def _nf4_splitk_reduce(ws_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """y[i] = bf16(sum_s ws[s, i]) over the flattened [m, n] output."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(tl.bfloat16), mask=mask)


# what _kernels() binds (and tests/triton_compile_check.py, which compiles without torch): the
# inline PTX as constexprs under the names the helpers use, and the jitted helpers
# one code's level by shuffle ($1: the code; $2, $3: the table address's low and high words)
_SHFL1_PTX = ("{ .reg .b32 l; .reg .b64 a; .reg .f32 t; mov.u32 l, %laneid; and.b32 l, l, 15;"
              " shl.b32 l, l, 2; or.b32 l, l, $2; mov.b64 a, {l, $3}; ld.global.nc.f32 t, [a];"
              " shfl.sync.idx.b32 $0, t, $1, 31, -1; }")
PTX = {"_DECODE8": _DECODE8_PTX, "_LOAD_X8": _LOAD_X8_PTX, "_SHFL8": _SHFL8_PTX,
       "_SHFL1": _SHFL1_PTX, "_ABSMAX_NESTED": _ABSMAX_NESTED_PTX, "_ABSMAX_FP16": _ABSMAX_FP16_PTX,
       "_ABSMAX_FP32": _ABSMAX_FP32_PTX, "_LOAD_W": _LOAD_W_PTX}
HELPERS = (_nf4_absmax, _nf4_absmax_rows, _nf4_levels, _nf4_decode8, _nf4_load_x8,
           _nf4_word_dot, _nf4_decode8_v4, _nf4_word_fma, _nf4_word_rows, _nf4_tile_shfl,
           _nf4_levels_shfl, _nf4_load_words)


@functools.cache
def _kernels() -> SimpleNamespace:
    """The jitted kernels (interpreted when TRITON_INTERPRET=1 was set before triton loaded)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    # a jitted function's globals must be constexpr
    globals().update({name: tl.constexpr(ptx) for name, ptx in PTX.items()})
    globals().update({f.__name__: triton.jit(f) for f in HELPERS})  # called by name
    return SimpleNamespace(gemv=triton.jit(_nf4_gemv_kernel), gemv4=triton.jit(_nf4_gemv4_kernel),
                           mma=triton.jit(_nf4_mma_kernel), reduce=triton.jit(_nf4_splitk_reduce),
                           dequant=triton.jit(_nf4_dequant_kernel))


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
    kernel: str  # "gemv", "mma" or "dequant" (which takes none of the tile fields)
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    group_n: int = 8
    decode: str = "table"  # the GEMV's: table, table4, shfl; the MMA's: table, shfl, shfl1, direct


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _divisor_block_k(k: int, want: int) -> int:
    """The largest power of two <= want that divides K (K % 64 == 0, so >= 64)."""
    bk = want
    while k % bk and bk > 64:
        bk //= 2
    return bk


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


def auto_decode(m: int) -> str:
    """The GEMV decode the heuristic takes for M rows (v4 holds at most GEMV4_MAX_M)."""
    return AUTO_DECODE if max(m, 1) <= GEMV4_MAX_M else "table"


def heuristic_config(m: int, n: int, k: int, sms: int, kernel: str = "",
                     decode: str = "") -> TileConfig:
    """The fallback when no tuned table matches (and the start point of `dqprof tune`);
    ``kernel`` forces one kernel's tiles at any M it takes, ``decode`` the GEMV's decode
    (empty: ``auto_decode``)."""
    m = max(m, 1)
    decode = decode or auto_decode(m)
    if kernel == "gemv" or (not kernel and m <= 4):  # decode: CUDA cores, one weight pass
        bm = 1 << (m - 1).bit_length()
        if decode != "table":  # v4: up to 4 rows of x a program, row groups beyond
            bm = min(bm, GEMV4_MAX_M)
        # v3 holds a [BLOCK_N, words] accumulator per row of x: narrower tiles stay in
        # registers at M > 1; v4's accumulators are 4x smaller, 32 rows fit at M = 2 (72 regs)
        bn = 32 if m == 1 or (m == 2 and decode != "table") else 16
        bk, warps = _divisor_block_k(k, 512), 4
        tiles = _cdiv(n, bn) * _cdiv(m, bm)
        split = _auto_split(tiles, k // bk, 4 * sms, 2, 16)
        return TileConfig("gemv", bm, bn, bk, split, warps, 1, decode=decode)
    if kernel == "dequant" or (not kernel and m >= DEQUANT_MIN_M):
        return TileConfig("dequant", 1, 1, 64, 1, 4, 1)
    if m <= 64:  # small batches: still bandwidth-bound, the MMA's N is the batch (>= 16)
        bm = max(16, 1 << (m - 1).bit_length())
        bn, bk, warps, stages = 64, _divisor_block_k(k, 128), 4, 3
        tiles = _cdiv(n, bn) * _cdiv(m, bm)
        split = _auto_split(tiles, k // bk, 2 * sms, 4, 8)
        split = min(split, max(1, k // (32 * m)))  # fp32 partials under a quarter of W
        return TileConfig("mma", bm, bn, bk, split, warps, stages)
    # prefill: compute-bound; 128 weight rows (two warpgroups) x 128 tokens
    bm = 128 if m >= 128 else 64
    bn, bk, warps, stages = 128, _divisor_block_k(k, 64), 8, 3
    tiles = _cdiv(n, bn) * _cdiv(m, bm)
    split = _auto_split(tiles, k // bk, sms, 8, 4)
    return TileConfig("mma", bm, bn, bk, split, warps, stages)


def tile_config(m: int, n: int, k: int, sms: int, opts: dict[str, Any],
                table: Any = None) -> TileConfig:
    """The config of one call: forced options > tuned table > heuristic. A forced decode
    other than the table entry's takes that decode's heuristic tiles (as a forced kernel does)."""
    asked = opts.get("decode") or ""
    decode = "shfl" if asked in MMA_ONLY_DECODES else asked  # the GEMV's
    cfg = (table.lookup(m, n, k) if table is not None else None) or heuristic_config(
        m, n, k, sms, decode=decode)
    tiles = any(opts.get(key) for key in ("block_m", "block_n", "block_k", "split_k",
                                          "num_warps", "num_stages"))
    want = opts.get("kernel") or ""
    if cfg.kernel == "dequant" and (want in ("gemv", "mma") or (not want and (asked or tiles))):
        cfg = _other_kernel(want or "mma", m, n, k, sms, decode)  # a decode or tile: the MMA
    if cfg.kernel == "gemv" and decode and decode != cfg.decode:
        cfg = heuristic_config(m, n, k, sms, decode=decode)
    forced = {key: opts[key] for key in ("kernel", "block_m", "block_n", "block_k", "split_k",
                                         "num_warps", "num_stages") if opts.get(key)}
    if forced:
        if forced.get("kernel", cfg.kernel) != cfg.kernel:  # another kernel: its own defaults
            cfg = _other_kernel(forced["kernel"], m, n, k, sms, decode)
        cfg = replace(cfg, **forced)
        if not decode and cfg.kernel == "gemv" and cfg.block_m > GEMV4_MAX_M:
            cfg = replace(cfg, decode="table")  # forced rows v4 cannot hold: v3's GEMV
    if cfg.kernel == "mma" and asked:  # the MMA's own decodes (MMA_DECODE), forced MMA too
        cfg = replace(cfg, decode={"table4": "table"}.get(asked, asked))
    if cfg.kernel == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"triton-nf4 kernel=gemv takes M <= {GEMV_MAX_M} (M={m})")
    if cfg.kernel == "gemv" and cfg.decode != "table" and cfg.block_m > GEMV4_MAX_M:
        raise ValueError(f"triton-nf4 decode={cfg.decode} takes BLOCK_M <= {GEMV4_MAX_M} "
                         f"(M={m}, BLOCK_M={cfg.block_m})")
    if k % cfg.block_k:
        cfg = replace(cfg, block_k=_divisor_block_k(k, cfg.block_k))
    return cfg


def _other_kernel(kernel: str, m: int, n: int, k: int, sms: int, decode: str) -> TileConfig:
    rows = min(m, GEMV_MAX_M) if kernel == "gemv" else m
    return heuristic_config(rows, n, k, sms, kernel, decode or auto_decode(rows))


# ---------------------------------------------------------------------------------------------
# State and the call (shared by the sweep's backend and the vLLM plugin)
# ---------------------------------------------------------------------------------------------

@dataclass
class Nf4State:
    packed: torch.Tensor  # uint8 [n, k/2]: bitsandbytes' NF4 bytes
    absmax: torch.Tensor  # nested: uint8 [n*k/64]; plain: fp16/fp32 [n*k/64]
    absmax2: torch.Tensor | None  # nested: fp32 [ceil(blocks/256)]; plain: None
    code2: torch.Tensor | None  # nested: the fp32 [256] dynamic map; plain: None
    offset: float  # nested: the mean bitsandbytes subtracted; plain: 0
    lut: torch.Tensor  # fp32 [16] NF4 levels
    n: int
    k: int

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def absmax_fp32(self) -> torch.Tensor:
        """fp32 absmax per block, decoded as the kernels decode it."""
        if not self.nested:
            return self.absmax.float()
        scale = self.absmax2.repeat_interleave(NESTED_BLOCK)[: self.absmax.numel()]
        return self.code2[self.absmax.long()] * scale + self.offset


def nf4_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels in fp32, as the kernels read them (64 bytes: one L1 line)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def quantize_state(weight: torch.Tensor, stats: str = "nested") -> Nf4State:
    """bf16 [n, k] -> NF4 state: bitsandbytes' own quantize_4bit where it runs (CUDA), else
    dqprof's torch quantizer (the same codes, see kernels/nf4.py)."""
    n, k = weight.shape
    if k % BLOCKSIZE:
        raise ValueError(f"triton-nf4 needs K % {BLOCKSIZE} == 0 (K={k})")
    if weight.is_cuda and _bnb_functional() is not None:
        packed, qs = _bnb_functional().quantize_4bit(
            weight.contiguous(), blocksize=BLOCKSIZE, quant_type="nf4",
            compress_statistics=stats == "nested")
        return from_bnb(packed, qs, n, k, stats)
    packed, absmax = [], []
    step = max(1, (1 << 22) // k)  # rows per chunk: bounds quantize_nf4's [numel, 16] temp
    for start in range(0, n, step):
        p, a = quantize_nf4(weight[start:start + step])
        packed.append(p)
        absmax.append(a)
    flat = torch.cat(absmax)
    lut = nf4_table(weight.device)
    if stats == "nested":
        q, a2, offset = quantize_absmax_nested(flat, NESTED_BLOCK)
        code2 = dynamic_map(weight.device)
        return Nf4State(torch.cat(packed).view(n, k // 2), q, a2, code2, offset, lut, n, k)
    plain = flat.to(_PLAIN_DTYPES[stats])
    if not torch.isfinite(plain).all():
        raise ValueError(f"block absmax overflows {stats}")
    return Nf4State(torch.cat(packed).view(n, k // 2), plain, None, None, 0.0, lut, n, k)


def from_bnb(packed: torch.Tensor, quant_state: Any, n: int, k: int,
             stats: str = "nested") -> Nf4State:
    """A state over bitsandbytes' own tensors (no copy of the packed weight): its NF4 bytes
    and its statistics, nested or plain (plain ones cast to ``stats`` if that is fp16/fp32)."""
    lut = nf4_table(packed.device)
    packed = packed.reshape(n, k // 2)
    if quant_state.nested:
        s2 = quant_state.state2
        return Nf4State(packed, quant_state.absmax.reshape(-1), s2.absmax.float().reshape(-1),
                        s2.code.float(), float(quant_state.offset), lut, n, k)
    absmax = quant_state.absmax.reshape(-1)
    if stats in _PLAIN_DTYPES:
        absmax = absmax.to(_PLAIN_DTYPES[stats])
    return Nf4State(packed, absmax, None, None, 0.0, lut, n, k)


@functools.cache
def _bnb_functional() -> Any:
    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # not installed, or no CUDA library for this GPU
        return None
    return bnbf


def _split_address(t: torch.Tensor) -> tuple[int, int]:
    """A tensor's address as (low, high) 32-bit words, each as a signed int32 (kernel args)."""
    addr = t.data_ptr()
    if addr % 64:
        raise ValueError("the NF4 level table must be 64-byte aligned")

    def signed(v: int) -> int:
        return v - (1 << 32) if v >= 1 << 31 else v

    return signed(addr & 0xFFFFFFFF), signed(addr >> 32)


def nf4_matmul(st: Nf4State, x: torch.Tensor, cfg: TileConfig) -> torch.Tensor:
    """y [m, n] bf16 = x [m, k] @ dequant(W).T with the given tile config."""
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, n, k = x.shape[0], st.n, st.k
    _check_interpreter(x.device)
    kern = _kernels()
    if cfg.kernel == "dequant":
        return x @ dequantize(st).T  # cuBLAS on the GPU
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if m == 0:
        return y
    out = y if cfg.split_k == 1 else torch.empty(cfg.split_k, m, n, dtype=torch.float32,
                                                 device=x.device)
    a2 = st.absmax2 if st.nested else st.absmax  # unused pointers when plain
    code2 = st.code2 if st.nested else st.lut
    # the row strides in words and in blocks are arguments (not K // 8 in the kernel), so
    # triton sees them divisible by 16 and loads 16 bytes a thread
    args = (x, st.packed.view(torch.int32), st.absmax, a2, code2, st.lut, out, m, n, k, k // 8,
            k // 64, st.offset, x.stride(0), n, m * n)
    if cfg.kernel == "gemv" and cfg.decode == "table":
        kern.gemv[(_cdiv(n, cfg.block_n), cfg.split_k)](
            *args, *_split_address(st.lut), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            SPLIT_K=cfg.split_k, NESTED=st.nested, ASM=x.is_cuda, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    elif cfg.kernel == "gemv":
        if cfg.decode not in ("table4", "shfl") or cfg.block_m > GEMV4_MAX_M:
            raise ValueError(f"triton-nf4 GEMV v4: decode={cfg.decode!r}, BLOCK_M={cfg.block_m}")
        if n * (k // BLOCKSIZE) >= 1 << 31:  # v4 indexes the statistics in int32
            raise ValueError(f"triton-nf4 decode={cfg.decode}: N * K / 64 must be < 2**31")
        groups = _cdiv(m, cfg.block_m)  # row groups of x (one at M <= BLOCK_M)
        kern.gemv4[(_cdiv(n, cfg.block_n) * groups, cfg.split_k)](
            *args, *_split_address(st.lut), groups, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, NESTED=st.nested,
            SHFL=cfg.decode == "shfl", ASM=x.is_cuda, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    else:
        grid = (_cdiv(m, cfg.block_m) * _cdiv(n, cfg.block_n), cfg.split_k)
        kern.mma[grid](*args, *_split_address(st.lut), BLOCK_M=cfg.block_m,
                       BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                       GROUP_N=cfg.group_n, NESTED=st.nested, SHFL=MMA_DECODE[cfg.decode],
                       ASM=x.is_cuda, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.split_k > 1:
        block = 1024
        kern.reduce[(_cdiv(m * n, block),)](out, y, m * n, SPLIT_K=cfg.split_k, BLOCK=block,
                                            num_warps=4)
    return y


# ---------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------

def dequantize(st: Nf4State) -> torch.Tensor:
    """The bf16 [n, k] weight, decoded by _nf4_dequant_kernel (kernel=dequant's first half)."""
    _check_interpreter(st.packed.device)
    words = st.n * st.k // 8
    w = torch.empty(st.n, st.k, dtype=torch.bfloat16, device=st.packed.device)
    a2 = st.absmax2 if st.nested else st.absmax
    code2 = st.code2 if st.nested else st.lut
    _kernels().dequant[(_cdiv(words, DEQUANT_WORDS),)](
        st.packed.view(torch.int32), st.absmax, a2, code2, st.lut, w, words, st.offset,
        NESTED=st.nested, BLOCK=DEQUANT_WORDS, num_warps=4)
    return w


def _check_pow2(name: str, value: Any, low: int) -> None:
    if value == 0:
        return
    if not isinstance(value, int) or value < low or value & (value - 1):
        raise ValueError(f"triton-nf4 option {name}={value!r}: a power of two >= {low} (0: auto)")


@register
class TritonNf4(Backend):
    name = "triton-nf4"
    description = ("our fused Triton NF4 GEMM on bitsandbytes' NF4 bytes and statistics (nested "
                   "by default): CUDA-core GEMV at M <= 4, transposed tensor-core GEMM to "
                   f"M < {DEQUANT_MIN_M}, dequantize to bf16 + cuBLAS from there")
    requires = ("triton",)
    devices = ("cuda",)
    options = {"kernel": "", "block_m": 0, "block_n": 0, "block_k": 0, "split_k": 0,
               "num_warps": 0, "num_stages": 0, "stats": "nested", "decode": "", "tuned": True}

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.opts
        _check_pow2("block_m", o["block_m"], 1)
        _check_pow2("block_n", o["block_n"], 16)
        _check_pow2("block_k", o["block_k"], 64)
        _check_pow2("num_warps", o["num_warps"], 1)
        for key in ("split_k", "num_stages"):
            if not isinstance(o[key], int) or o[key] < 0:
                raise ValueError(f"triton-nf4 option {key}={o[key]!r}: an integer >= 0 (0: auto)")
        if o["stats"] not in STATS:
            raise ValueError(f"triton-nf4 option stats={o['stats']!r}: one of {', '.join(STATS)}")
        if o["decode"] not in ("", *DECODES):
            raise ValueError(f"triton-nf4 option decode={o['decode']!r}: one of "
                             f"{', '.join(DECODES)} (empty: {AUTO_DECODE} at M <= "
                             f"{GEMV4_MAX_M}, else table)")
        if o["kernel"] not in ("", *KERNELS):
            raise ValueError(f"triton-nf4 option kernel={o['kernel']!r}: one of "
                             f"{', '.join(KERNELS)}")
        tiles = [key for key in ("block_m", "block_n", "block_k", "split_k", "num_warps",
                                 "num_stages", "decode") if o[key]]
        if o["kernel"] == "dequant" and tiles:  # it has no tiles: never ignore one silently
            raise ValueError(f"triton-nf4 kernel=dequant takes no tile or decode option "
                             f"({', '.join(tiles)}): those are the GEMV's and the MMA's")
        self._table = None

    def supports(self, shape: LinearShape) -> str | None:
        if reason := super().supports(shape):
            return reason
        if shape.k % BLOCKSIZE:  # NF4 blocks must not straddle rows; N tails are masked
            return f"triton-nf4 needs K % {BLOCKSIZE} == 0 (K={shape.k})"
        return None

    def prepare(self, weight: torch.Tensor, shape: LinearShape) -> Nf4State:
        return quantize_state(weight, self.opts["stats"])

    def table(self, device: torch.device) -> Any:
        """The tuned table for this GPU (None: heuristic only, or ``tuned=false``)."""
        if self._table is None and self.opts["tuned"] and device.type == "cuda":
            from dqprof.kernels.tuned import table_for_device

            self._table = table_for_device(device) or False
        return self._table or None

    def config(self, m: int, n: int, k: int, device: torch.device) -> TileConfig:
        return tile_config(m, n, k, _sm_count(device), self.opts, self.table(device))

    def __call__(self, st: Nf4State, x: torch.Tensor) -> torch.Tensor:
        return nf4_matmul(st, x, self.config(x.shape[0], st.n, st.k, x.device))

    def launch_config(self, st: Nf4State, m: int) -> dict[str, Any]:
        cfg = self.config(m, st.n, st.k, st.packed.device)
        table = self.table(st.packed.device)
        forced = any(self.opts[key] for key in ("kernel", "block_m", "block_n", "block_k",
                                                 "split_k", "num_warps", "num_stages", "decode"))
        source = ("options" if forced else "tuned" if table is not None
                  and table.lookup(m, st.n, st.k) == cfg else "heuristic")
        return {**asdict(cfg), "source": source, "table": table.path if table else None}

    def reference(self, st: Nf4State) -> torch.Tensor:
        # our torch decoder, from the stored statistics the kernels decode
        return dequantize_nf4(st.packed, st.absmax_fp32(), (st.n, st.k), BLOCKSIZE)

    def clone(self, st: Nf4State) -> Nf4State:
        return replace(st, packed=st.packed.clone(), absmax=st.absmax.clone(),
                       absmax2=None if st.absmax2 is None else st.absmax2.clone())

    def traffic(self, shape: LinearShape, m: int, kernels: list[dict] | None = None) -> Traffic:
        # the minimum: split-K's fp32 partials (mostly L2-resident) are not counted
        stats = self.opts["stats"]
        if stats == "nested":  # uint8 codes, fp32 per 256 blocks, offset, the 256-entry map
            scales = nf4_stats(shape.n, shape.k, nested=True) - 256 * 4 + LUT_BYTES
            t = nf4_fused(m, shape.n, shape.k, 0, scales)
        else:
            t = nf4_fused(m, shape.n, shape.k, _PLAIN_DTYPES[stats].itemsize, LUT_BYTES)
        if kernels is not None:
            unfused = any(k.get("category") == "dequant" for k in kernels)
        else:
            unfused = tile_config(m, shape.n, shape.k, DEFAULT_SMS, self.opts).kernel == "dequant"
        if unfused:  # the bf16 weight written, then read by the GEMM
            t = replace(t, intermediate=2 * 2 * shape.n * shape.k)
        return t
