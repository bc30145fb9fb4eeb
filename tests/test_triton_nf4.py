"""triton-nf4: the fused NF4 GEMM kernel, its packing, its tiling heuristic.

Kernel tests run in Triton's interpreter on CPU, in a subprocess: ``TRITON_INTERPRET=1`` takes
effect only if set before triton is first imported (triton's own jitted helpers such as
``tl.cdiv`` are wrapped at import), and in a pytest session bitsandbytes (which imports triton)
may well have been imported already. The subprocess also works around two numerics gaps of
triton 3.9's interpreter so it computes what the GPU computes: ``tl.dot`` on bf16 operands
multiplies their raw uint16 bit patterns, and fp32 -> bf16 casts truncate instead of rounding
to nearest even. The GPU tests (``-m gpu``) run the compiled kernels (inline PTX included) on
real Gemma 4 shapes, and on bitsandbytes' own CUDA-quantized bytes.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dqprof.bytemodel import NF4_BLOCK
from dqprof.errors import DqprofError
from dqprof.kernels import create
from dqprof.kernels.nf4 import (
    NF4_LEVELS,
    dynamic_map,
    nf4_levels,
    quantize_nf4,
    unpack_nf4,
)
from dqprof.kernels.triton_nf4 import (
    DEQUANT_MIN_M,
    LUT_BYTES,
    MMA_ONLY_DECODES,
    Nf4State,
    TileConfig,
    TritonNf4,
    from_bnb,
    heuristic_config,
    nf4_table,
    quantize_state,
    tile_config,
)
from dqprof.kernels.tuned import load_table, parse_table
from dqprof.models.shapes import LinearShape
from dqprof.sweep import REL_TOL, rel_error

ROOT = Path(__file__).resolve().parents[1]
BF16_TOL = 5e-3  # a bf16 output of fp32 sums: ~4e-3 at worst against the fp32 product

# (spec, n, k, m): what each case exercises is noted on the right; every case runs with both
# statistics forms (nested, the default, and plain fp16).
CASES: list[tuple[str, int, int, int]] = [
    # GEMV v3 (decode=table; the default decode at M <= 4 is v4's shfl, below)
    ("triton-nf4[decode=table]", 128, 512, 1),  # gemv, BLOCK_M 1 (one reduction after the loop)
    ("triton-nf4[decode=table]", 128, 512, 3),  # gemv, BLOCK_M 4: masked M rows
    ("triton-nf4[kernel=gemv]", 64, 512, 8),  # gemv, BLOCK_M 8, BLOCK_N 16
    ("triton-nf4[kernel=mma]", 128, 256, 5),  # mma at decode M: BLOCK_M 16
    ("triton-nf4[kernel=mma]", 128, 256, 33),  # mma, BLOCK_M 64, masked M tail
    ("triton-nf4[kernel=mma]", 64, 256, 80),  # the prefill tile (BLOCK_N 128, 8 warps), masked N
    ("triton-nf4[block_m=128]", 64, 256, 80),  # the 128 x 128 prefill tile, masked M and N
    ("triton-nf4[decode=table,split_k=2]", 64, 1024, 1),  # gemv split-K (2 k-tiles) + reduction
    ("triton-nf4[kernel=mma,split_k=2]", 64, 512, 5),  # mma split-K + reduction
    ("triton-nf4[kernel=mma]", 96, 256, 5),  # N tail: BLOCK_N 64 over N 96
    ("triton-nf4[decode=table,block_n=64]", 96, 256, 2),  # gemv N tail
    ("triton-nf4[decode=table]", 64, 192, 1),  # K 192: gemv BLOCK_K falls back to 64
    ("triton-nf4[kernel=mma]", 64, 192, 5),  # K 192: mma BLOCK_K falls back to 64
    ("triton-nf4[decode=table,block_n=16]", 64, 256, 3),  # gemv, forced BLOCK_N 16
    ("triton-nf4[kernel=mma,block_n=16]", 64, 256, 5),  # mma, forced BLOCK_N 16
    # GEMV v4 (the interpreter runs the shuffle decode's arithmetic with table loads)
    ("triton-nf4", 128, 512, 1),  # the default at M = 1: shfl, BLOCK_M 1, BLOCK_N 32
    ("triton-nf4[decode=shfl]", 72, 512, 2),  # BLOCK_M 2, BLOCK_N 32 over N 72: clamped rows
    ("triton-nf4[decode=shfl]", 64, 512, 3),  # BLOCK_M 4: masked M rows
    ("triton-nf4[decode=shfl,split_k=2]", 64, 1024, 1),  # split-K + reduction
    ("triton-nf4[decode=table4]", 64, 192, 2),  # K 192: BLOCK_K 64, two groups a row
    ("triton-nf4[kernel=gemv,decode=shfl]", 64, 512, 8),  # 2 row groups of BLOCK_M 4
    ("triton-nf4[kernel=gemv,decode=table4]", 72, 256, 6),  # 2 groups, the second masked
    # the MMA's shuffle decode (levels joined back into k order)
    ("triton-nf4[kernel=mma,decode=shfl]", 96, 256, 5),  # BLOCK_M 16, N tail
    ("triton-nf4[decode=shfl,block_m=128]", 64, 256, 80),  # the prefill tile, masked M and N
    ("triton-nf4[kernel=mma,decode=shfl1]", 64, 512, 5),  # a shuffle per nibble, split K tiles
    # the MMA's direct decode (each weight loads its own word and absmax)
    ("triton-nf4[kernel=mma,decode=direct]", 96, 256, 5),  # N tail: clamped rows, not stored
    ("triton-nf4[decode=direct,block_m=128]", 64, 256, 80),  # the prefill tile, masked M
    ("triton-nf4[kernel=mma,decode=direct,split_k=2]", 64, 512, 17),  # split K, 2 M tiles
    # dequantize to bf16, then the bf16 matmul (the default from DEQUANT_MIN_M rows)
    ("triton-nf4", 96, 320, 70),  # 3840 words: the last program masked
    ("triton-nf4[kernel=dequant]", 64, 192, 3),  # forced at decode M
]
STATS_FORMS = ("nested", "fp16")
# x = identity: each output is one dequantized weight, bf16(w) exactly through either kernel
# (the GEMV multiplies fp32 levels by 0 and 1; the MMA rounds w to bf16 and adds zeros)
EXACT_CASES: list[tuple[str, int, int]] = [
    ("triton-nf4[kernel=mma]", 64, 128),
    ("triton-nf4[kernel=mma,stats=fp16]", 64, 128),
    ("triton-nf4[kernel=gemv]", 64, 128),
    ("triton-nf4[kernel=gemv,stats=fp16]", 64, 128),
    ("triton-nf4[kernel=gemv,decode=shfl]", 64, 128),
    ("triton-nf4[kernel=gemv,decode=shfl,stats=fp16]", 64, 128),
    ("triton-nf4[kernel=mma,decode=shfl]", 64, 128),
    ("triton-nf4[kernel=mma,decode=shfl1]", 64, 128),
    ("triton-nf4[kernel=mma,decode=direct]", 64, 128),
    ("triton-nf4[kernel=mma,decode=direct,stats=fp16]", 64, 128),
    ("triton-nf4[kernel=dequant]", 64, 128),
    ("triton-nf4[kernel=dequant,stats=fp16]", 64, 128),
]
# the GEMV takes M <= 16 (v4: 4): the identity goes through it 8 (4) rows at a time
GEMV_ROWS = 8
GEMV4_ROWS = 4


def _with_stats(spec: str, stats: str) -> str:
    if stats == "nested":
        return spec
    opts = spec[spec.index("[") + 1:-1] + "," if "[" in spec else ""
    return f"triton-nf4[{opts}stats={stats}]"


def _shape(n: int, k: int) -> LinearShape:
    return LinearShape("test", "test", n, k, (n,), ("test",), 1)


# ---------------------------------------------------------------------------------------------
# The interpreter worker (python tests/test_triton_nf4.py, with TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------

def _patch_interpreter() -> None:
    """Make triton's interpreter compute bf16 like the GPU (see the module docstring)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti

    builder = ti.InterpreterBuilder
    dot, trunc = builder.create_dot, builder.create_fp_trunc

    def as_fp32(h: Any) -> Any:
        if h.dtype.scalar == tl.bfloat16:  # stored as uint16 bit patterns
            return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self: Any, a: Any, b: Any, d: Any, *args: Any) -> Any:
        return dot(self, as_fp32(a), as_fp32(b), d, *args)

    def create_fp_trunc(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:  # RTNE
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            bits = bits.astype(np.uint64)
            out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return ti.TensorHandle(out, tl.bfloat16)
        return trunc(self, src, dst_type)

    builder.create_dot = create_dot
    builder.create_fp_trunc = create_fp_trunc


def _worker() -> dict[str, Any]:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _patch_interpreter()
    results: dict[str, Any] = {"cases": [], "exact": []}
    for i, ((base, n, k, m), stats) in enumerate(itertools.product(CASES, STATS_FORMS)):
        spec = _with_stats(base, stats)
        torch.manual_seed(1000 + i)
        b = create(spec)
        state = b.prepare((torch.randn(n, k) * 0.02).to(torch.bfloat16), _shape(n, k))
        x = torch.randn(m, k, dtype=torch.bfloat16)
        y = b(state, x)
        results["cases"].append({
            "case": [spec, n, k, m], "nested": state.nested, "shape": list(y.shape),
            "dtype": str(y.dtype), "config": vars(b.config(m, n, k, x.device)),
            "rel_err": rel_error(y, b.expected(state, x)),
        })
    for i, (spec, n, k) in enumerate(EXACT_CASES):
        torch.manual_seed(2000 + i)
        b = create(spec)
        state = b.prepare((torch.randn(n, k) * 0.02).to(torch.bfloat16), _shape(n, k))
        eye = torch.eye(k, dtype=torch.bfloat16)
        rows = k if b.opts["kernel"] != "gemv" else GEMV4_ROWS if b.opts["decode"] else GEMV_ROWS
        y = torch.cat([b(state, eye[r:r + rows]) for r in range(0, k, rows)])  # [k, n]: W.T
        w = b.reference(state).to(torch.bfloat16).t()
        results["exact"].append({"case": [spec, n, k], "nested": state.nested,
                                 "kernel": b.config(rows, n, k, eye.device).kernel,
                                 "decode": b.config(rows, n, k, eye.device).decode,
                                 "equal": bool(torch.equal(y, w)),
                                 "max_abs": float((y.float() - w.float()).abs().max())})
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"interpreter worker failed:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------
# Kernel, in the interpreter
# ---------------------------------------------------------------------------------------------

CASE_IDS = [f"{_with_stats(sp, st)}-n{n}-k{k}-m{m}"
            for (sp, n, k, m), st in itertools.product(CASES, STATS_FORMS)]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_kernel_matches_reference(interpreted: dict[str, Any], index: int) -> None:
    r = interpreted["cases"][index]
    spec, n, k, m = r["case"]
    assert r["shape"] == [m, n] and r["dtype"] == "torch.bfloat16"
    assert r["nested"] == ("stats=" not in spec)
    assert r["rel_err"] < REL_TOL and r["rel_err"] < BF16_TOL, r  # vs the fp32 product


def test_cases_cover_the_paths(interpreted: dict[str, Any]) -> None:
    configs = [(r["case"][3], r["config"]) for r in interpreted["cases"]]
    assert {c["block_m"] for _, c in configs if c["kernel"] == "gemv"} >= {1, 4, 8}
    assert {c["block_m"] for _, c in configs if c["kernel"] == "mma"} >= {16, 64, 128}
    assert any(c["block_n"] == 128 and c["num_warps"] == 8 for m, c in configs if m == 80)
    for kernel in ("gemv", "mma"):
        assert any(c["kernel"] == kernel and c["split_k"] == 2 for _, c in configs)
        assert any(c["kernel"] == kernel and c["block_k"] == 64 for _, c in configs)  # K 192
        assert any(c["kernel"] == kernel and c["block_n"] == 16 for _, c in configs)
    assert any(m == 5 and c["kernel"] == "mma" for m, c in configs)  # forced below M 9
    assert {m for m, c in configs if c["kernel"] == "dequant"} == {3, 70}
    assert all(c["kernel"] == "gemv" for m, c in configs if m == 1)
    v4 = [(m, c) for m, c in configs if c["decode"] != "table" and c["kernel"] == "gemv"]
    assert {c["block_m"] for _, c in configs
            if c["decode"] == "shfl" and c["kernel"] == "mma"} == {16, 128}
    assert {c["block_m"] for _, c in v4} == {1, 2, 4} and {c["decode"] for _, c in v4} == {
        "shfl", "table4"}
    assert {m for m, c in v4 if m > c["block_m"]} == {6, 8}  # row groups
    assert any(c["kernel"] == "gemv" and c["decode"] == "table" and c["block_m"] == 4
               for m, c in configs if m == 3)  # v3 at M <= 4 when asked for
    assert any(c["split_k"] == 2 for _, c in v4) and any(c["block_k"] == 64 for _, c in v4)
    assert any(c["block_n"] == 16 for _, c in v4) and any(c["block_n"] == 32 for _, c in v4)


@pytest.mark.parametrize("index", range(len(EXACT_CASES)), ids=[s for s, *_ in EXACT_CASES])
def test_identity_gives_the_bf16_weight(interpreted: dict[str, Any], index: int) -> None:
    r = interpreted["exact"][index]
    spec = r["case"][0]
    assert r["kernel"] == spec.split("kernel=")[1].split(",")[0].rstrip("]")
    asked = next((o[7:] for o in spec[spec.find("[") + 1:-1].split(",")
                  if o.startswith("decode=")), "table")
    assert r["decode"] == asked
    assert r["nested"] == ("stats=" not in spec)
    assert r["equal"], r


# ---------------------------------------------------------------------------------------------
# Compilation for sm_90, without a GPU
# ---------------------------------------------------------------------------------------------

def test_every_tile_config_compiles_for_sm90() -> None:
    """Every tile config the heuristic (and the regression gate's forced tile) picks for the
    Gemma 4 E4B shapes compiles for sm_90 with the installed triton: the interpreter does not
    run triton's GPU passes (triton 3.6 failed in one for every wgmma tile, BLOCK_M >= 64).
    One compilation per tile config (``--quick``); tests/triton_compile_check.py without it
    compiles every argument specialization a sweep triggers."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_compile_check.py"),
                           "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = proc.stdout.splitlines()
    if proc.returncode == 2:
        pytest.skip(next((ln for ln in lines if ln.startswith("SKIP")), proc.stdout[-500:]))
    failures = [ln for ln in lines if ln.startswith("FAIL")]
    assert proc.returncode == 0 and lines and not failures, (
        "\n".join(failures) or f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------
# Format: bitsandbytes' bytes and statistics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_quantize_matches_bitsandbytes(dtype: torch.dtype) -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = (torch.randn(256, 512) * 0.02).to(dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4",
                                    compress_statistics=False)
    ours, absmax = quantize_nf4(w)
    assert torch.equal(packed.reshape(-1), ours)
    assert torch.equal(qs.absmax.float(), absmax)
    # and the backend keeps those bytes as they are: uint8 [n, k/2], one absmax per block
    state = create("triton-nf4[stats=fp16]").prepare(w, _shape(256, 512))
    assert state.packed.shape == (256, 256) and state.packed.dtype == torch.uint8
    assert torch.equal(state.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(state.absmax, qs.absmax.reshape(-1).half())


def test_quantize_ties_differ_from_bitsandbytes_only_at_midpoints() -> None:
    """At an exact midpoint between two levels bitsandbytes takes the lower level (its decision
    tree tests ``x > midpoint``); quantize_nf4 takes the nearer level as fp32 subtraction
    rounds it, sometimes the upper. Only such ties differ, by one code."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    levels = torch.tensor(NF4_LEVELS)
    mids = (levels[:-1] + levels[1:]) / 2
    w = torch.zeros(2, 64)
    w[:, 0] = 1.0  # absmax 1: scaled values are the midpoints themselves
    w[0, 1:16] = mids
    w[1, 1:16] = -mids
    packed, _ = bnbf.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4",
                                   compress_statistics=False)
    theirs, ours = unpack_nf4(packed), unpack_nf4(quantize_nf4(w)[0])
    diff = (theirs != ours).nonzero().flatten()
    assert len(diff) > 0  # the tie-breaking differs (6 of 15 midpoints here)
    assert ((theirs[diff] - ours[diff]).abs() == 1).all()
    x = w.reshape(-1)[diff]
    lv = nf4_levels()
    assert torch.allclose((x - lv[theirs[diff]]).abs(), (x - lv[ours[diff]]).abs(), atol=1e-6)
    # off the midpoints (one ulp either side) the two agree
    for direction in (2.0, -2.0):
        v = w.clone()
        v[0, 1:16] = torch.nextafter(mids, torch.tensor(direction))
        p, _ = bnbf.quantize_4bit(v, blocksize=NF4_BLOCK, quant_type="nf4",
                                  compress_statistics=False)
        assert torch.equal(p.reshape(-1), quantize_nf4(v)[0])


@pytest.mark.parametrize("nested", (True, False), ids=("nested", "plain"))
def test_from_bnb_decodes_as_bitsandbytes(nested: bool) -> None:
    """Our state over bitsandbytes' own tensors decodes to what its dequantize_4bit returns."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    n, k = 256, 512
    w = torch.randn(n, k) * 0.02
    w[3, 70] = 0.5  # one outlier block: the nested absmax spans a wide range
    packed, qs = bnbf.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4",
                                    compress_statistics=nested)
    state = from_bnb(packed, qs, n, k)
    assert state.nested == nested and state.packed.shape == (n, k // 2)
    if nested:
        assert state.absmax.dtype == torch.uint8 and state.code2.numel() == 256
    theirs = bnbf.dequantize_4bit(packed, qs).float()
    ours = TritonNf4().reference(state)
    assert ours.shape == theirs.shape == (n, k)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-6
    assert float((ours - w).norm() / w.norm()) < 0.2  # 4-bit: about 10 %


def test_nested_statistics_track_the_plain_absmax() -> None:
    torch.manual_seed(0)
    w = (torch.randn(64, 1024) * 0.02).to(torch.bfloat16)
    state = quantize_state(w, "nested")
    _, plain = quantize_nf4(w)
    assert state.nested and state.absmax.dtype == torch.uint8
    assert state.absmax.numel() == 64 * 1024 // NF4_BLOCK
    assert state.absmax2.numel() == -(-state.absmax.numel() // 256)
    approx = state.absmax_fp32()
    assert approx.dtype == torch.float32 and approx.shape == plain.shape
    assert float(((approx - plain) / plain).abs().max()) < 0.02  # the 8-bit dynamic map


def test_dynamic_map() -> None:
    code = dynamic_map()
    assert code.dtype == torch.float32 and code.numel() == 256
    assert torch.equal(code, code.sort().values)
    assert float(code.min()) >= -1 and float(code.max()) == 1
    assert bool((code == 0).any()) and bool((code == 1).any())


def test_level_table() -> None:
    table = nf4_table()
    assert table.dtype == torch.float32 and table.numel() * 4 == LUT_BYTES
    assert torch.equal(table, torch.tensor(NF4_LEVELS, dtype=torch.float32))
    assert table[7] == 0 and table[0] == -1 and table[15] == 1


@pytest.mark.parametrize("stats", ("fp16", "fp32"))
def test_reference_uses_the_stored_absmax(stats: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.02
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[stats]
    b = create(f"triton-nf4[stats={stats}]")
    state = b.prepare(w, _shape(32, 128))
    assert not state.nested and state.absmax.dtype == dtype and state.absmax.shape == (64,)
    packed, am = quantize_nf4(w)
    codes = nf4_levels()[unpack_nf4(packed)].view(-1, NF4_BLOCK)
    expected = (codes * am.to(dtype).float()[:, None]).view(32, 128)
    assert torch.equal(b.reference(state), expected)


# ---------------------------------------------------------------------------------------------
# Options, tile heuristic, tuned tables, shape rule, byte model
# ---------------------------------------------------------------------------------------------

def test_options_parse_and_validate() -> None:
    b = create("triton-nf4[block_n=16,block_k=64]")
    assert b.variant == "block_k=64,block_n=16"
    assert create("triton-nf4").variant == ""
    assert create("triton-nf4[kernel=mma,stats=fp32]").opts["stats"] == "fp32"
    assert create("triton-nf4[decode=shfl]").opts["decode"] == "shfl"
    for bad in ("block_n=24", "block_n=8", "block_k=32", "block_m=3", "split_k=-1",
                "num_stages=-1", "stats=fp8", "kernel=cuda", "num_warps=3", "tile=4",
                "decode=lds", "kernel=dequant,block_n=64", "kernel=dequant,decode=shfl"):
        with pytest.raises(DqprofError):
            create(f"triton-nf4[{bad}]")


GEMMA = {"mlp.gate_up_proj": (20480, 2560), "mlp.down_proj": (2560, 10240)}
SHAPES = ((3072, 2560), (2560, 2048), (20480, 2560), (2560, 10240), (256, 2560), (2560, 256))


def test_tile_heuristic() -> None:
    sms = 132
    for (n, k), m in itertools.product(SHAPES, (1, 2, 3, 4, 5, 8, 9, 16, 33, 63, 64, 65, 256,
                                                4096)):
        cfg = heuristic_config(m, n, k, sms)
        want = "gemv" if m <= 4 else "mma" if m < DEQUANT_MIN_M else "dequant"
        assert cfg.kernel == want, (m, n, k, cfg)
        assert tile_config(m, n, k, sms, TritonNf4.options) == cfg  # no table, no options
        if cfg.kernel == "dequant":
            continue
        assert cfg.block_m >= (m if m <= 4 else min(m, 64)), (m, cfg)
        assert k % cfg.block_k == 0 and cfg.block_k >= 64, (m, n, k, cfg)
        assert (k // cfg.block_k) % cfg.split_k == 0, (m, n, k, cfg)  # no split idles
        assert tile_config(m, n, k, sms, TritonNf4.options) == cfg  # no table, no options
    assert heuristic_config(1, 4096, 192, sms).block_k == 64
    assert heuristic_config(33, 4096, 192, sms).block_k == 64
    assert heuristic_config(4096, 20480, 2560, sms, "mma").num_warps == 8  # the prefill tile
    # decode with few output rows: split-K fills the SMs
    assert heuristic_config(1, 2560, 10240, sms).split_k > 1
    # GEMV v4: the decode reaches the GEMV's config only; 32 rows at M = 2 (v3: 16)
    auto = TritonNf4.options
    for decode in ("table4", "shfl"):
        opts = {**auto, "decode": decode}
        assert tile_config(1, 20480, 2560, sms, opts) == heuristic_config(1, 20480, 2560, sms,
                                                                          decode=decode)
        assert tile_config(2, 20480, 2560, sms, opts).block_n == 32
        assert tile_config(4, 20480, 2560, sms, opts).decode == decode
        mma = tile_config(16, 20480, 2560, sms, opts)  # the MMA: shuffle, or its table
        assert (mma.kernel, mma.decode) == ("mma", "shfl" if decode == "shfl" else "table")
    # no decode asked for: v4's shuffle where it holds the rows, v3 where a forced GEMV runs more
    assert tile_config(2, 20480, 2560, sms, auto).decode == "shfl"
    assert tile_config(2, 20480, 2560, sms, {**auto, "decode": "table"}).block_n == 16
    gemv8 = tile_config(8, 20480, 2560, sms, {**auto, "kernel": "gemv"})
    assert (gemv8.decode, gemv8.block_m) == ("table", 8)
    forced_rows = tile_config(1, 20480, 2560, sms, {**auto, "block_m": 8})
    assert (forced_rows.decode, forced_rows.block_m) == ("table", 8)


def test_forced_options_win() -> None:
    sms, auto = 132, TritonNf4.options
    forced = tile_config(1, 2560, 10240, sms, {**auto, "block_n": 16, "block_k": 64,
                                               "split_k": 1})
    assert (forced.kernel, forced.block_n, forced.block_k, forced.split_k) == (
        "gemv", 16, 64, 1)
    mma = tile_config(1, 2560, 10240, sms, {**auto, "kernel": "mma"})
    assert mma.kernel == "mma" and mma.block_m >= 16
    for decode in ("shfl", "shfl1", "direct"):  # a forced MMA at decode M keeps its decode
        forced_mma = tile_config(1, 2560, 10240, sms, {**auto, "kernel": "mma", "decode": decode})
        assert (forced_mma.kernel, forced_mma.decode) == ("mma", decode)
    gemv = tile_config(8, 2560, 10240, sms, {**auto, "kernel": "gemv", "num_warps": 8})
    assert (gemv.kernel, gemv.num_warps) == ("gemv", 8)
    assert tile_config(1, 2560, 192, sms, {**auto, "block_k": 128}).block_k == 64  # divides K
    # past DEQUANT_MIN_M a decode or a tile asks for the MMA; kernel=dequant at any M
    for opts in ({"decode": "shfl"}, {"block_n": 64}, {"kernel": "mma"}):
        assert tile_config(4096, 20480, 2560, sms, {**auto, **opts}).kernel == "mma", opts
    assert tile_config(4096, 20480, 2560, sms, {**auto, "block_n": 64}).block_n == 64
    assert tile_config(1, 2560, 10240, sms, {**auto, "kernel": "dequant"}).kernel == "dequant"
    with pytest.raises(ValueError, match="M <= 16"):
        tile_config(17, 2560, 10240, sms, {**auto, "kernel": "gemv"})
    with pytest.raises(ValueError, match="M <= 16"):
        create("triton-nf4[kernel=gemv]").config(32, 2560, 10240, torch.device("cpu"))
    # v4 holds 4 rows' accumulators: more rows run in row groups, a forced wider BLOCK_M fails
    grouped = tile_config(8, 2560, 10240, sms, {**auto, "kernel": "gemv", "decode": "shfl"})
    assert (grouped.kernel, grouped.decode, grouped.block_m) == ("gemv", "shfl", 4)
    with pytest.raises(ValueError, match="BLOCK_M <= 4"):
        tile_config(8, 2560, 10240, sms, {**auto, "kernel": "gemv", "decode": "shfl",
                                          "block_m": 8})


def test_launch_config_says_where_the_tiles_came_from() -> None:
    st = quantize_state(torch.randn(64, 128, dtype=torch.bfloat16), "fp32")
    auto = create("triton-nf4").launch_config(st, 1)
    assert auto["kernel"] == "gemv" and auto["source"] == "heuristic" and auto["table"] is None
    forced = create("triton-nf4[decode=shfl]").launch_config(st, 2)
    assert (forced["decode"], forced["source"]) == ("shfl", "options")
    assert create("bf16").launch_config(None, 1) is None  # paths without tiles record none


def _table_data(gpu: str = "NVIDIA H200") -> dict[str, Any]:
    gemv = {"kernel": "gemv", "block_m": 1, "block_n": 16, "block_k": 256, "split_k": 4,
            "num_warps": 2, "num_stages": 1}
    mma = {"kernel": "mma", "block_m": 16, "block_n": 64, "block_k": 128, "split_k": 2,
           "num_warps": 4, "num_stages": 4, "group_n": 4}
    return {"schema": 1, "gpu": gpu, "entries": [  # unsorted: the lookup sorts buckets
        {"n": 2560, "k": 10240, "m_max": 64, "config": mma},
        {"n": 2560, "k": 10240, "m_max": 1, "config": gemv},
    ]}


def test_tuned_table_lookup() -> None:
    table = parse_table(_table_data(), "h200.json")
    assert table.gpu == "NVIDIA H200"
    one = table.lookup(1, 2560, 10240)
    assert one == TileConfig("gemv", 1, 16, 256, 4, 2, 1)
    for m in (2, 16, 64):  # the smallest bucket that covers M
        assert table.lookup(m, 2560, 10240) == TileConfig("mma", 16, 64, 128, 2, 4, 4, 4)
    assert table.lookup(65, 2560, 10240) is None  # past the last bucket
    assert table.lookup(1, 20480, 2560) is None  # another shape
    auto = TritonNf4.options
    assert tile_config(1, 2560, 10240, 132, auto, table) == one
    assert tile_config(65, 2560, 10240, 132, auto, table) == heuristic_config(65, 2560, 10240,
                                                                              132)
    assert tile_config(1, 2560, 10240, 132, {**auto, "split_k": 1}, table).split_k == 1
    # a forced decode: that decode's heuristic tiles over the table's (tuned for another
    # decode); forced with the GEMV over the table's MMA, it stays
    shfl = {**auto, "decode": "shfl"}
    assert tile_config(1, 2560, 10240, 132, shfl, table) == heuristic_config(
        1, 2560, 10240, 132, decode="shfl")
    gemv4 = tile_config(4, 2560, 10240, 132, {**shfl, "kernel": "gemv"}, table)
    assert (gemv4.kernel, gemv4.block_m, gemv4.decode) == ("gemv", 4, "shfl")
    assert tile_config(4, 2560, 10240, 132, shfl, table).kernel == "mma"  # the table's
    bad = _table_data()
    bad["entries"][0]["config"]["block_k"] = 0
    with pytest.raises(ValueError, match="entry 0"):
        parse_table(bad, "bad.json")
    v4 = _table_data()
    v4["entries"][1]["config"]["decode"] = "shfl"  # a table may name the GEMV's decode
    assert parse_table(v4, "v4.json").lookup(1, 2560, 10240).decode == "shfl"
    v4["entries"][1]["config"]["decode"] = "lds"
    with pytest.raises(ValueError, match="entry 1: decode"):
        parse_table(v4, "bad.json")
    dq = _table_data()  # a bucket may dequantize (its tile fields are parsed, not used)
    dq["entries"][0]["config"]["kernel"] = "dequant"
    assert parse_table(dq, "dq.json").lookup(16, 2560, 10240).kernel == "dequant"


def test_tuned_table_files(tmp_path: Path) -> None:
    good = tmp_path / "h200.json"
    good.write_text(json.dumps(_table_data()))
    assert load_table(good, "NVIDIA H200") is not None
    assert load_table(good, None) is not None  # any GPU
    other = tmp_path / "h100.json"
    other.write_text(json.dumps(_table_data("NVIDIA H100 80GB HBM3")))
    with pytest.warns(UserWarning, match="H100"):
        assert load_table(other, "NVIDIA H200") is None
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": 1, "entries": [')
    with pytest.warns(UserWarning, match="ignoring"):
        assert load_table(broken, "NVIDIA H200") is None
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"schema": 1, "gpu": "NVIDIA H200",
                                 "entries": [{"n": 1, "k": 64, "m_max": 1,
                                              "config": {"kernel": "cutlass"}}]}))
    with pytest.warns(UserWarning, match="ignoring"):
        assert load_table(wrong, "NVIDIA H200") is None


def test_shape_rule() -> None:
    b = TritonNf4()
    assert b.supports(_shape(2560, 10240)) is None
    assert b.supports(_shape(100, 256)) is None  # N tails are masked
    assert "K % 64" in (b.supports(_shape(256, 96)) or "")
    assert b.unavailable("cpu")  # timed on CUDA only; the interpreter is for tests
    unquantized = LinearShape("lm_head", "lm_head", 256, 256, (256,), ("lm_head",), 1,
                              quantized=False)
    assert b.supports(unquantized)


def test_traffic() -> None:
    n, k, m = 2560, 10240, 16
    blocks = n * k // NF4_BLOCK
    t = TritonNf4().traffic(_shape(n, k), m)
    assert t.weight == n * k // 2
    # uint8 codes, fp32 absmax per 256 blocks, the offset, the 256-entry map, the level table
    assert t.scales == blocks + 4 * -(-blocks // 256) + 4 + 1024 + LUT_BYTES
    assert (t.act_in, t.act_out, t.intermediate) == (2 * m * k, 2 * m * n, 0)
    fp16 = create("triton-nf4[stats=fp16]").traffic(_shape(n, k), m)
    assert (fp16.weight, fp16.scales) == (n * k // 2, 2 * blocks + LUT_BYTES)
    assert create("triton-nf4[stats=fp32]").traffic(_shape(n, k), m).scales == (
        4 * blocks + LUT_BYTES)
    b = TritonNf4()
    assert b.resident_bytes(_shape(n, k)) == t.weight + t.scales
    # kernel=dequant writes the bf16 weight and reads it back: by its config, or by what ran
    big = b.traffic(_shape(n, k), DEQUANT_MIN_M)
    assert (big.weight, big.scales, big.intermediate) == (t.weight, t.scales, 4 * n * k)
    assert create("triton-nf4[kernel=mma]").traffic(_shape(n, k), 4096).intermediate == 0
    assert b.traffic(_shape(n, k), 16, [{"category": "dequant"}, {"category": "gemm"}]
                     ).intermediate == 4 * n * k
    assert b.traffic(_shape(n, k), 4096, [{"category": "gemm"}]).intermediate == 0


def test_cpu_without_interpreter_says_why() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process interprets")
    pytest.importorskip("triton")
    b = TritonNf4()
    state = b.prepare(torch.randn(32, 64), _shape(32, 64))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        b(state, torch.randn(1, 64, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernels on Gemma 4 shapes, and on bitsandbytes' CUDA bytes
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_SPECS = ("triton-nf4", "triton-nf4[stats=fp16]", "triton-nf4[kernel=mma]",
             "triton-nf4[decode=shfl]", "triton-nf4[decode=shfl,stats=fp16]",
             "triton-nf4[decode=table4]", "triton-nf4[kernel=mma,decode=shfl1]",
             "triton-nf4[kernel=mma,decode=direct]", "triton-nf4[decode=direct,stats=fp32]")
# the GEMV's decodes (GEMV v3's table, v4's table and shuffle: DECODES), as the GPU runs them
GPU_DECODES = ("table", "table4", "shfl")


@pytest.fixture(scope="module")
def gemma_states() -> Callable[[str, str], Nf4State]:
    cache: dict[tuple[str, str], Nf4State] = {}

    def get(layer: str, stats: str = "nested") -> Nf4State:
        if (layer, stats) not in cache:
            n, k = GEMMA[layer]
            gen = torch.Generator(device="cpu").manual_seed(0)
            w = (torch.randn(n, k, generator=gen) * 0.02).to("cuda", torch.bfloat16)
            cache[layer, stats] = quantize_state(w, stats)
        return cache[layer, stats]

    return get


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", (1, 2, 3, 4, 16, 256))
@pytest.mark.parametrize("layer", tuple(GEMMA))
@pytest.mark.parametrize("spec", GPU_SPECS)
def test_gpu_gemma_shapes(gemma_states: Callable[[str, str], Nf4State], spec: str, layer: str,
                          m: int) -> None:
    pytest.importorskip("triton")
    b = create(spec)
    state = gemma_states(layer, b.opts["stats"])
    assert state.nested == (b.opts["stats"] == "nested")
    x = torch.randn(m, state.k, device="cuda", dtype=torch.bfloat16)
    y = b(state, x)
    assert y.shape == (m, state.n) and y.dtype == torch.bfloat16
    cfg = b.config(m, state.n, state.k, x.device)
    plain = spec in ("triton-nf4", "triton-nf4[stats=fp16]")  # no kernel, tile nor decode asked
    assert cfg.kernel == ("gemv" if m <= 8 and "kernel=mma" not in spec else
                          "dequant" if m >= DEQUANT_MIN_M and plain else "mma")
    asked = b.opts["decode"]
    if cfg.kernel == "gemv" and asked:  # else the tuned table's or auto_decode's
        # an MMA-only decode leaves the GEMV its own (shfl)
        assert cfg.decode == ("shfl" if asked in MMA_ONLY_DECODES else asked)
    if cfg.kernel == "mma" and asked:
        assert cfg.decode == {"table4": "table"}.get(asked, asked)
    assert rel_error(y, b.expected(state, x)) < REL_TOL


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", (5, 8, 16))
@pytest.mark.parametrize("layer", tuple(GEMMA))
@pytest.mark.parametrize("decode", ("table4", "shfl"))
def test_gpu_gemv4_row_groups(gemma_states: Callable[[str, str], Nf4State], decode: str,
                              layer: str, m: int) -> None:
    """GEMV v4 past 4 rows of x: row groups of 4, the last one masked at M = 5."""
    pytest.importorskip("triton")
    b = create(f"triton-nf4[kernel=gemv,decode={decode}]")
    state = gemma_states(layer, "nested")
    x = torch.randn(m, state.k, device="cuda", dtype=torch.bfloat16)
    cfg = b.config(m, state.n, state.k, x.device)
    assert (cfg.kernel, cfg.decode, cfg.block_m) == ("gemv", decode, 4)
    assert rel_error(b(state, x), b.expected(state, x)) < REL_TOL


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("stats", STATS_FORMS)
@pytest.mark.parametrize("decode", ("table4", "shfl"))
def test_gpu_identity_gives_the_bf16_weight(decode: str, stats: str) -> None:
    """The compiled GEMV v4 (PTX decode included) at x = identity: each output is one weight,
    bf16(level * absmax) exactly, so every nibble position and code is checked bit for bit.
    (v4 rounds the nested absmax as the reference does; v3's compiled absmax is one fused
    multiply-add, so its identity check is the interpreter's.)"""
    pytest.importorskip("triton")
    n, k = 256, 512
    b = create(f"triton-nf4[kernel=gemv,decode={decode},stats={stats}]")
    gen = torch.Generator(device="cpu").manual_seed(3)
    state = b.prepare((torch.randn(n, k, generator=gen) * 0.02).to("cuda", torch.bfloat16),
                      _shape(n, k))
    eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")
    assert b.config(GEMV4_ROWS, n, k, eye.device).decode == decode
    y = torch.cat([b(state, eye[r:r + GEMV4_ROWS]) for r in range(0, k, GEMV4_ROWS)])
    assert torch.equal(y, b.reference(state).to(torch.bfloat16).t())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", (1, 16, 256))
@pytest.mark.parametrize("decode", GPU_DECODES)
def test_gpu_cuda_graph_capture(gemma_states: Callable[[str], Nf4State], decode: str,
                                m: int) -> None:
    """The timed path: captured once, replayed on new inputs, the output follows."""
    pytest.importorskip("triton")
    b = TritonNf4(decode=decode)
    state = gemma_states("mlp.down_proj")  # split-K at m=1 and 16: two kernels in the graph
    _assert_graph_follows_new_inputs(b, state, m)


def _assert_graph_follows_new_inputs(b: TritonNf4, state: Nf4State, m: int) -> None:
    x = torch.randn(m, state.k, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        b(state, x)  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = b(state, x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(y, b.expected(state, x)) < REL_TOL


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("stats", ("nested", "fp32"))
def test_gpu_dequant_path(gemma_states: Callable[[str, str], Nf4State], stats: str) -> None:
    """kernel=dequant, the default from DEQUANT_MIN_M: the compiled decode gives bf16(level *
    absmax) bit for bit on plain statistics (nested ones: the compiled absmax is one fused
    multiply-add, so to within one bf16 step), and the call captured in a CUDA graph (its
    scratch from the graph's pool) follows new inputs on replay."""
    pytest.importorskip("triton")
    from dqprof.kernels.triton_nf4 import dequantize

    state = gemma_states("mlp.down_proj", stats)
    w, ref = dequantize(state), TritonNf4().reference(state)
    if stats == "nested":
        assert ((w.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-30).all()
    else:
        assert torch.equal(w, ref.to(torch.bfloat16))
    b = TritonNf4(stats=stats)
    assert b.config(DEQUANT_MIN_M + 3, state.n, state.k, state.packed.device).kernel == "dequant"
    _assert_graph_follows_new_inputs(b, state, DEQUANT_MIN_M + 3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", (1, 4, 16, 256))
@pytest.mark.parametrize("layer", tuple(GEMMA))
@pytest.mark.parametrize("decode", GPU_DECODES)
def test_gpu_bitsandbytes_bytes(decode: str, layer: str, m: int) -> None:
    """bitsandbytes' own CUDA quantize_4bit (nested statistics, as vLLM stores them) through
    our kernels: the product of bitsandbytes' own dequantized weight."""
    pytest.importorskip("triton")
    bnbf = pytest.importorskip("bitsandbytes.functional")
    n, k = GEMMA[layer]
    gen = torch.Generator(device="cpu").manual_seed(1)
    w = (torch.randn(n, k, generator=gen) * 0.02).to("cuda", torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4",
                                    compress_statistics=True)
    state = from_bnb(packed, qs, n, k)
    assert state.nested
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = TritonNf4(decode=decode)(state, x)
    expected = x.float() @ bnbf.dequantize_4bit(packed, qs).float().t()
    assert rel_error(y, expected) < REL_TOL


if __name__ == "__main__":  # the interpreter worker, run by the ``interpreted`` fixture
    print("RESULT " + json.dumps(_worker()))


def test_the_bundled_h200_table_is_found_and_valid() -> None:
    from dqprof.kernels.tuned import table_for_gpu

    table_for_gpu.cache_clear()
    try:
        os.environ.pop("DQPROF_NF4_CONFIG", None)
        table = table_for_gpu("NVIDIA H200")
        assert table is not None and table.path.endswith("configs/h200.json")
        for (n, k), rows in table.entries.items():
            for m_max, _ in rows:
                cfg = table.lookup(m_max, n, k)
                # a GEMV below the bucket's M runs v4's row groups (v3, decode=table, cannot)
                assert k % cfg.block_k == 0 and (cfg.kernel == "mma" or cfg.block_m >= m_max
                                                 or cfg.decode != "table")
                # what a call at that M runs: the table's entry, through the same validation
                assert tile_config(m_max, n, k, 132, TritonNf4.options, table) == cfg
        assert table_for_gpu("NVIDIA L4") is None  # other GPUs: the heuristic
    finally:
        table_for_gpu.cache_clear()
