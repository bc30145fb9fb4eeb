"""triton-nf4: the fused NF4 GEMM kernel, its packing, its tiling heuristic.

Kernel tests run in Triton's interpreter on CPU, in a subprocess: ``TRITON_INTERPRET=1`` takes
effect only if set before triton is first imported (triton's own jitted helpers such as
``tl.cdiv`` are wrapped at import), and in a pytest session bitsandbytes (which imports triton)
may well have been imported already. The subprocess also works around two numerics gaps of
triton 3.9's interpreter so it computes what the GPU computes: ``tl.dot`` on bf16 operands
multiplies their raw uint16 bit patterns, and fp32 -> bf16 casts truncate instead of rounding
to nearest even. The GPU tests (``-m gpu``) run the compiled kernel on real Gemma 4 shapes.
"""

from __future__ import annotations

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
from dqprof.kernels.nf4 import NF4_LEVELS, nf4_levels, quantize_nf4, unpack_nf4
from dqprof.kernels.triton_nf4 import LUT_BYTES, Nf4State, TritonNf4, nf4_table, tile_config
from dqprof.models.shapes import LinearShape
from dqprof.sweep import REL_TOL, rel_error

ROOT = Path(__file__).resolve().parents[1]
EMUL_TOL = 1e-3  # vs the kernel's own bf16 weight in fp32: only summation order differs

# (spec, n, k, m): what each case exercises is noted on the right.
CASES: list[tuple[str, int, int, int]] = [
    ("triton-nf4", 128, 256, 1),  # decode tile, one row of 16 used
    ("triton-nf4", 128, 256, 5),
    ("triton-nf4", 128, 256, 33),  # 16 < M <= 64 tile, masked M tail
    ("triton-nf4", 64, 256, 80),  # M > 64 with few tiles: the 64-row prefill tile
    ("triton-nf4[block_m=128]", 64, 256, 80),  # the 128-row prefill tile
    ("triton-nf4", 96, 192, 5),  # N tail (BLOCK_N 64), BLOCK_K shrunk to divide K
    ("triton-nf4", 64, 1024, 1),  # automatic split-K (2) and the reduction kernel
    ("triton-nf4[block_n=16,block_k=32]", 128, 256, 5),  # the regression gate's slow config
    ("triton-nf4[block_n=16,block_k=32]", 128, 256, 33),
    ("triton-nf4[block_k=128]", 96, 192, 5),  # masked K tail tile (EVEN_K False)
    ("triton-nf4[split_k=3,block_k=64]", 128, 256, 5),  # 4 k-tiles in 3 splits: one empty
    ("triton-nf4[absmax=fp32,block_m=32]", 128, 256, 33),
]
# x = identity: each output is one dequantized weight, so the tile must be bit-exact.
EXACT_CASES: list[tuple[str, int, int]] = [
    ("triton-nf4[block_m=128]", 64, 128),  # M = 128: the prefill tile
    ("triton-nf4[block_m=16,block_n=32]", 64, 128),  # the decode tile, 8 M tiles
]


def _shape(n: int, k: int) -> LinearShape:
    return LinearShape("test", "test", n, k, (n,), ("test",), 1)


def _kernel_weight(state: Nf4State) -> torch.Tensor:
    """The bf16 weight the kernel multiplies: bf16(fp16 level * absmax), computed in fp32."""
    codes = unpack_nf4(state.packed.cpu())
    w = nf4_table().float()[codes].view(-1, NF4_BLOCK) * state.absmax.cpu().float().view(-1, 1)
    return w.view(state.n, state.k).to(torch.bfloat16)


def _emulated(state: Nf4State, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes: its bf16 weights, fp32 sums, one bf16 rounding of the output."""
    w = _kernel_weight(state).float().to(x.device)
    return (x.float() @ w.t()).to(torch.bfloat16).float()


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
    for i, (spec, n, k, m) in enumerate(CASES):
        torch.manual_seed(1000 + i)
        b = create(spec)
        state = b.prepare((torch.randn(n, k) * 0.02).to(torch.bfloat16), _shape(n, k))
        x = torch.randn(m, k, dtype=torch.bfloat16)
        y = b(state, x)
        results["cases"].append({
            "case": [spec, n, k, m], "shape": list(y.shape), "dtype": str(y.dtype),
            "config": vars(b.config(m, n, k, x.device)),
            "rel_err": rel_error(y, b.expected(state, x)),
            "emul_err": rel_error(y, _emulated(state, x)),
        })
    for i, (spec, n, k) in enumerate(EXACT_CASES):
        torch.manual_seed(2000 + i)
        b = create(spec)
        state = b.prepare((torch.randn(n, k) * 0.02).to(torch.bfloat16), _shape(n, k))
        y = b(state, torch.eye(k, dtype=torch.bfloat16))  # [k, n]: the weight, transposed
        w = _kernel_weight(state).t()
        results["exact"].append({"case": [spec, n, k], "equal": bool(torch.equal(y, w)),
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

@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{s}-n{n}-k{k}-m{m}"
                                                         for s, n, k, m in CASES])
def test_kernel_matches_reference(interpreted: dict[str, Any], index: int) -> None:
    r = interpreted["cases"][index]
    spec, n, k, m = r["case"]
    assert r["shape"] == [m, n] and r["dtype"] == "torch.bfloat16"
    assert r["rel_err"] < REL_TOL, r  # against the fp32 dequantized weight
    assert r["emul_err"] < EMUL_TOL, r  # against bf16 weights, fp32 accumulation


def test_cases_cover_the_paths(interpreted: dict[str, Any]) -> None:
    configs = [r["config"] for r in interpreted["cases"]]
    assert {c["block_m"] for c in configs} >= {16, 32, 64, 128}
    assert any(c["split_k"] > 1 for c, (s, *_) in zip(configs, CASES, strict=True)
               if "split_k" not in s)  # the heuristic split, not only a forced one
    assert any(c["block_n"] == 16 and c["block_k"] == 32 for c in configs)


@pytest.mark.parametrize("index", range(len(EXACT_CASES)))
def test_dequantized_tile_is_bit_exact(interpreted: dict[str, Any], index: int) -> None:
    r = interpreted["exact"][index]
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
# Format: the same bytes as bitsandbytes
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
    # and the backend keeps those bytes as they are: uint8 [n, k/2], absmax [n, k/64] in fp16
    state = TritonNf4().prepare(w, _shape(256, 512))
    assert torch.equal(state.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(state.absmax, qs.absmax.view(256, 512 // NF4_BLOCK).half())


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


def test_level_table() -> None:
    table = nf4_table()
    assert table.dtype == torch.float16 and table.numel() * 2 == LUT_BYTES
    # fp16 levels: within fp16's rounding of the fp32 levels, below bf16's output rounding
    rel = (table.float() - nf4_levels()).abs() / nf4_levels().abs().clamp(min=1e-9)
    assert float(rel.max()) <= 2.0**-11
    assert table[7] == 0 and table[0] == -1 and table[15] == 1


def test_reference_uses_the_stored_absmax() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.02
    for absmax, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        b = create(f"triton-nf4[absmax={absmax}]")
        state = b.prepare(w, _shape(32, 128))
        assert state.absmax.dtype == dtype and state.absmax.shape == (32, 2)
        packed, am = quantize_nf4(w)
        codes = nf4_levels()[unpack_nf4(packed)].view(-1, NF4_BLOCK)
        expected = (codes * am.to(dtype).float()[:, None]).view(32, 128)
        assert torch.equal(b.reference(state), expected)
        assert float((expected - w).norm() / w.norm()) < 0.2  # 4-bit: about 10%


# ---------------------------------------------------------------------------------------------
# Options, tiling heuristic, shape rule, byte model
# ---------------------------------------------------------------------------------------------

def test_options_parse_and_validate() -> None:
    b = create("triton-nf4[block_n=16,block_k=32]")
    assert b.variant == "block_k=32,block_n=16"
    assert create("triton-nf4").variant == ""
    for bad in ("block_n=24", "block_k=16", "block_m=8", "split_k=-1", "absmax=fp8",
                "num_warps=3", "tile=4"):
        with pytest.raises(DqprofError):
            create(f"triton-nf4[{bad}]")


def test_tile_heuristic() -> None:
    sms, auto = 132, TritonNf4.options
    # decode: one M tile, enough CTAs through BLOCK_N 64 and split-K over divisors of k-tiles
    up = tile_config(1, 20480, 2560, sms, auto)
    assert (up.block_m, up.block_n, up.block_k, up.split_k) == (16, 64, 128, 2)
    down = tile_config(16, 2560, 10240, sms, auto)  # 20 n-tiles of 128: the split caps at 16
    assert (down.block_m, down.block_n, down.block_k, down.split_k) == (16, 128, 128, 16)
    assert tile_config(16, 20480, 2560, sms, auto).split_k == 4  # partials <= weight / 4
    for cfg, k in ((up, 2560), (down, 10240)):
        k_tiles = k // cfg.block_k
        assert k_tiles % cfg.split_k == 0 and k_tiles // cfg.split_k >= 4
    big = tile_config(4096, 20480, 2560, sms, auto)
    assert (big.block_m, big.block_n, big.block_k, big.split_k, big.num_warps) == (
        128, 128, 64, 1, 8)
    few = tile_config(256, 2560, 10240, sms, auto)  # 40 tiles of 128 x 128: fill the SMs
    assert (few.block_m, few.split_k) == (64, 2)
    # forced options win; the rest stays automatic
    forced = tile_config(1, 2560, 10240, sms, {**auto, "block_n": 16, "block_k": 32,
                                               "split_k": 1})
    assert (forced.block_m, forced.block_n, forced.block_k, forced.split_k) == (16, 16, 32, 1)
    # small N: BLOCK_N no wider than N needs; K not a multiple of 128: BLOCK_K divides K
    assert tile_config(1, 16, 192, sms, auto).block_n == 16
    assert tile_config(1, 4096, 192, sms, auto).block_k == 64


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
    b = TritonNf4()
    n, k, m = 2560, 10240, 16
    t = b.traffic(_shape(n, k), m)
    assert t.weight == n * k // 2
    assert t.scales == 2 * n * k // 64 + LUT_BYTES
    assert (t.act_in, t.act_out, t.intermediate) == (2 * m * k, 2 * m * n, 0)
    assert create("triton-nf4[absmax=fp32]").traffic(_shape(n, k), m).scales == (
        4 * n * k // 64 + LUT_BYTES)
    assert b.resident_bytes(_shape(n, k)) == t.weight + t.scales


def test_cpu_without_interpreter_says_why() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process interprets")
    pytest.importorskip("triton")
    b = TritonNf4()
    state = b.prepare(torch.randn(32, 64), _shape(32, 64))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        b(state, torch.randn(1, 64, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernel on Gemma 4 shapes
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GEMMA = {"mlp.gate_up_proj": (20480, 2560), "mlp.down_proj": (2560, 10240)}


@pytest.fixture(scope="module")
def gemma_states() -> Callable[[str], Nf4State]:
    cache: dict[str, Nf4State] = {}

    def get(layer: str) -> Nf4State:
        if layer not in cache:
            n, k = GEMMA[layer]
            gen = torch.Generator(device="cpu").manual_seed(0)
            w = (torch.randn(n, k, generator=gen) * 0.02).to("cuda", torch.bfloat16)
            cache[layer] = TritonNf4().prepare(w, _shape(n, k))
        return cache[layer]

    return get


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", (1, 16, 256))
@pytest.mark.parametrize("layer", tuple(GEMMA))
@pytest.mark.parametrize("spec", ("triton-nf4", "triton-nf4[block_n=16,block_k=32]"))
def test_gpu_gemma_shapes(gemma_states: Callable[[str], Nf4State], spec: str, layer: str,
                          m: int) -> None:
    pytest.importorskip("triton")
    b = create(spec)
    state = gemma_states(layer)  # option-independent: the same packed state serves every spec
    x = torch.randn(m, state.k, device="cuda", dtype=torch.bfloat16)
    y = b(state, x)
    assert y.shape == (m, state.n) and y.dtype == torch.bfloat16
    assert rel_error(y, b.expected(state, x)) < REL_TOL
    assert rel_error(y, _emulated(state, x)) < 5 * EMUL_TOL


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", (1, 16, 256))
def test_gpu_cuda_graph_capture(gemma_states: Callable[[str], Nf4State], m: int) -> None:
    """The timed path: captured once, replayed on new inputs, the output follows."""
    pytest.importorskip("triton")
    b = TritonNf4()
    state = gemma_states("mlp.down_proj")  # split-K at m=1 and 16: two kernels in the graph
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


if __name__ == "__main__":  # the interpreter worker, run by the ``interpreted`` fixture
    print("RESULT " + json.dumps(_worker()))
