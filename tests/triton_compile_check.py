"""Compile triton-nf4's kernels for every tile config its heuristic picks, no GPU needed.

    python tests/triton_compile_check.py [--quick] [--asm] [--variant OPTS] [--arch 90] [-j N]

Compiles ``_nf4_gemv_kernel`` and ``_nf4_mma_kernel`` (and the split-K reduction) ahead of
time for ``--arch`` (sm_90 by default) with the installed triton, for every Gemma 4 E4B linear
shape and every M of the sweep (1, 2, 4, ..., 4096 and 600), with the argument specialization
triton's launcher would derive on the GPU (16-divisible integers and pointers, integers equal
to 1 as constants), for the heuristic, the tensor-core kernel forced at every M
(``kernel=mma``), the plain fp16 statistics (``stats=fp16``) and the GEMV v4 decodes
(``decode=shfl``, ``decode=table4``; ``--variant``: any spec's options instead). GEMV v4 also
fails here if its k-loop touches shared memory (``shared_in_loop``: a layout conversion).
No torch and no driver: the kernels and ``tile_config`` are read out of
``dqprof/kernels/triton_nf4.py``, so this runs in a bare ``pip install triton numpy`` venv
(to try another triton version) as well as on the GPU machine (a pre-flight before a sweep).
``--quick`` compiles each distinct tile config once instead of every argument specialization;
``--asm`` prints registers, spills, shared memory and the k-loop's SASS per config (instructions
per warp per k-tile, CTA barriers, global loads). Exit status 1 if any config fails to compile,
2 if this triton cannot compile for the target at all (no nvidia backend, no ptxas).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import itertools
import multiprocessing
import os
import re
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KERNEL_FILE = Path(__file__).resolve().parents[1] / "dqprof" / "kernels" / "triton_nf4.py"
# Gemma 4 E4B's linear layers, (N, K) as the sweep times them
GEMMA4_E4B = ((3072, 2560), (2560, 2048), (6144, 2560), (2560, 4096), (20480, 2560),
              (2560, 10240), (256, 2560), (2560, 256), (10752, 2560))
SWEEP_M = tuple(1 << i for i in range(13)) + (600,)
tl: Any = None  # triton.language, bound by main() (the probe kernel resolves it here)
# PTX and HELPERS: the inline PTX and the jitted helpers the kernels take by name
_NEEDED = ("BLOCKSIZE", "DECODES", "TileConfig", "tile_config", "_nf4_gemv_kernel",
           "_nf4_gemv4_kernel", "_nf4_mma_kernel", "_nf4_splitk_reduce", "_nf4_dequant_kernel",
           "DEQUANT_WORDS", "PTX", "HELPERS", "MMA_DECODE")


def _stdlib_import(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        if node.level or node.module == "__future__":  # relative; __future__: see load()
            return False
        names = [node.module or ""]
    else:
        names = [alias.name for alias in node.names]
    return all(name.split(".")[0] in sys.stdlib_module_names for name in names)


def load(triton_language: Any = None, path: Path = KERNEL_FILE) -> dict[str, Any]:
    """``tile_config`` and the kernel functions of triton_nf4.py, without importing torch.

    Each top-level statement of the file runs on its own, compiled from the file itself (same
    file name and line numbers, so ``inspect.getsource`` -- which ``triton.jit`` needs --
    finds the kernels). Only standard-library imports run; a statement that then fails for
    want of a name (torch, the backend registry) is left out. What remains is plain Python
    (``tile_config``) and the kernel functions."""
    tree = ast.parse(path.read_text(), str(path))
    mod = types.ModuleType("_triton_nf4_kernels")  # dataclass() looks its module up
    mod.__file__ = str(path)
    sys.modules[mod.__name__] = mod
    ns = mod.__dict__
    # the file's own future imports (unevaluated annotations) head every statement's module
    future = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom) and not _stdlib_import(node):
            continue
        code = compile(ast.Module(body=[*future, node], type_ignores=[]), str(path), "exec",
                       dont_inherit=True)
        try:
            exec(code, ns)
        except (NameError, AttributeError):
            pass
    missing = [name for name in _NEEDED if name not in ns]
    if missing:
        raise RuntimeError(f"{path}: could not define {', '.join(missing)} without its imports")
    ns.update(tl=triton_language)  # the kernels resolve ``tl`` here when compiled
    if triton_language is not None:  # what triton_nf4._kernels() binds on first use
        import triton

        ns.update({name: triton_language.constexpr(ptx) for name, ptx in ns["PTX"].items()})
        ns.update({f.__name__: triton.jit(f) for f in ns["HELPERS"]})
    return ns


def _int_spec(v: int) -> tuple[str, Any]:
    """(signature type, attribute or constant) as triton's launcher specializes an int."""
    if v == 1:
        return "constexpr", 1
    return ("i32" if -2**31 <= v < 2**31 else "i64"), ("D" if v % 16 == 0 else "")


@dataclass(frozen=True)
class Job:
    kernel: str  # "gemv", "gemv4", "mma", "dequant" or "reduce"
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    divisible: tuple[str, ...]
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        c = dict(self.constexprs)
        if self.kernel == "reduce":
            return f"reduce SPLIT_K={c['SPLIT_K']}"
        if self.kernel == "dequant":
            stats = "nested" if c["NESTED"] else dict(self.signature)["a_ptr"][1:]
            return f"dequant stats={stats} BLOCK={c['BLOCK']} w={self.num_warps}"
        ints = ",".join(f"{k}={v}" for k, v in self.constexprs if not k.isupper())
        stats = "nested" if c["NESTED"] else dict(self.signature)["a_ptr"][1:]
        group = f" GN={c['GROUP_N']}" if "GROUP_N" in c else ""
        group += f" SHFL={int(c['SHFL'])}" if "SHFL" in c else ""
        return (f"{self.kernel} stats={stats} BM={c['BLOCK_M']} BN={c['BLOCK_N']} "
                f"BK={c['BLOCK_K']} SK={c['SPLIT_K']}{group} w={self.num_warps} "
                f"s={self.num_stages}" + (f" [{ints}]" if ints else ""))


AUTO = {"kernel": "", "block_m": 0, "block_n": 0, "block_k": 0, "split_k": 0, "num_warps": 0,
        "num_stages": 0, "stats": "nested", "decode": ""}
STRING_OPTS = ("kernel", "stats", "decode")
# what the sweep and the GPU tests run: the heuristic, tensor cores at every M, plain stats,
# and the GEMV v4 decodes (the shuffle decode is PTX only: the interpreter cannot run it)
VARIANTS = ("", "kernel=mma", "stats=fp16", "decode=shfl", "decode=table4",
            "decode=shfl,stats=fp16", "kernel=mma,decode=shfl1", "kernel=mma,decode=direct")
STATS_PTR = {"nested": "*u8", "fp16": "*fp16", "fp32": "*fp32"}
# a stand-in for the level table's address words: the low word is 64-byte aligned
LUT_LO, LUT_HI = 0x1234_5640, 0x7F3A


def parse_variant(text: str, decodes: tuple[str, ...] = ()) -> dict[str, Any]:
    """``"kernel=mma,block_k=64"`` (a backend spec's options) -> the full options dict;
    ``decodes``: the kernel file's DECODES (any decode passes without them)."""
    opts = dict(AUTO)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in opts:
            raise SystemExit(f"unknown triton-nf4 option {key!r}")
        opts[key] = value if key in STRING_OPTS else int(value)
    if opts["stats"] not in STATS_PTR:
        raise SystemExit(f"unknown triton-nf4 stats {opts['stats']!r}")
    if decodes and opts["decode"] not in ("", *decodes):
        raise SystemExit(f"unknown triton-nf4 decode {opts['decode']!r}")
    return opts


def jobs(ns: dict[str, Any], shapes=GEMMA4_E4B, ms=SWEEP_M, sms: int = 132,
         quick: bool = False, variants=VARIANTS) -> dict[Job, list[tuple[Any, ...]]]:
    """The compilations a sweep over variants x shapes x ms triggers: job -> its uses."""
    out: dict[Job, list[tuple[Any, ...]]] = {}
    for variant, (n, k), m in itertools.product(variants, shapes, ms):
        opts = parse_variant(variant, ns["DECODES"])
        nested = opts["stats"] == "nested"
        cfg = ns["tile_config"](m, n, k, sms, opts)
        if cfg.kernel == "dequant":  # one specialization per statistics form (cuBLAS after it)
            a_ptr = STATS_PTR[opts["stats"]]
            words = 17 if quick else n * k // 8
            sig = (("w_ptr", "*i32"), ("a_ptr", a_ptr), ("a2_ptr", "*fp32" if nested else a_ptr),
                   ("code2_ptr", "*fp32"), ("lut_ptr", "*fp32"), ("out_ptr", "*bf16"),
                   ("WORDS", _int_spec(words)[0]), ("offset", "fp32"),
                   ("NESTED", "constexpr"), ("BLOCK", "constexpr"))
            div = ("w_ptr", "a_ptr", "a2_ptr", "code2_ptr", "lut_ptr", "out_ptr") + (
                ("WORDS",) if _int_spec(words)[1] == "D" else ())
            job = Job("dequant", sig, (("NESTED", nested), ("BLOCK", ns["DEQUANT_WORDS"])), div,
                      cfg.num_warps, cfg.num_stages)
            out.setdefault(job, []).append((variant, m, n, k))
            continue
        # GEMV v4 (_nf4_gemv4_kernel) for the decodes other than v3's table
        kernel = "gemv4" if cfg.kernel == "gemv" and cfg.decode != "table" else cfg.kernel
        # as nf4_matmul passes them: row strides in int32 words and in blocks, x's row stride,
        # the output's row and split strides
        ints = {"M": m, "N": n, "K": k, "kw": k // 8, "kb": k // ns["BLOCKSIZE"],
                "stride_xm": k, "stride_om": n, "stride_os": m * n}
        ints.update(lut_lo=LUT_LO, lut_hi=LUT_HI)  # every kernel but the reduction
        if kernel == "gemv4":  # row groups of x (1, specialized, at M <= BLOCK_M)
            ints.update(R=-(-m // cfg.block_m))
        if quick:  # one specialization per tile config: M, N, K plain, strides as usual
            ints.update(M=17, N=17, K=17, stride_os=17)
        a_ptr = STATS_PTR[opts["stats"]]
        # plain statistics: nf4_matmul passes absmax and the level table for the unused ones
        sig = [("x_ptr", "*bf16"), ("w_ptr", "*i32"), ("a_ptr", a_ptr),
               ("a2_ptr", "*fp32" if nested else a_ptr), ("code2_ptr", "*fp32"),
               ("lut_ptr", "*fp32"), ("out_ptr", "*bf16" if cfg.split_k == 1 else "*fp32")]
        consts: list[tuple[str, Any]] = []
        div = [name for name, _ in sig]
        for name, v in ints.items():
            if name == "stride_xm":  # the kernels take the fp32 nested offset before strides
                sig.append(("offset", "fp32"))
            ty, attr = _int_spec(v)
            sig.append((name, ty))
            if ty == "constexpr":
                consts.append((name, attr))
            elif attr:
                div.append(name)
        tiles = [("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n), ("BLOCK_K", cfg.block_k),
                 ("SPLIT_K", cfg.split_k)]
        if cfg.kernel == "mma":
            tiles.append(("GROUP_N", cfg.group_n))
        if kernel == "gemv4":
            tiles.append(("SHFL", cfg.decode == "shfl"))
        elif kernel == "mma":
            tiles.append(("SHFL", ns["MMA_DECODE"][cfg.decode]))
        for name, v in (*tiles, ("NESTED", nested), ("ASM", True)):
            sig.append((name, "constexpr"))
            consts.append((name, v))
        job = Job(kernel, tuple(sig), tuple(consts), tuple(div), cfg.num_warps,
                  cfg.num_stages)
        out.setdefault(job, []).append((variant, m, n, k))
        if cfg.split_k > 1:
            mn = 17 if quick else m * n
            ty, attr = _int_spec(mn)
            rsig = (("ws_ptr", "*fp32"), ("y_ptr", "*bf16"), ("MN", ty),
                    ("SPLIT_K", "constexpr"), ("BLOCK", "constexpr"))
            rjob = Job("reduce", rsig, (("SPLIT_K", cfg.split_k), ("BLOCK", 1024)),
                       ("ws_ptr", "y_ptr") + (("MN",) if attr == "D" else ()), 4, 3)
            out.setdefault(rjob, []).append((variant, m, n, k))
    return out


def compile_job(job: Job, kernels: dict[str, Any], arch: int) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernels[job.kernel]
    names = [name for name, _ in job.signature]
    attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in job.divisible}
    src = ASTSource(fn, dict(job.signature), dict(job.constexprs), attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": job.num_warps, "num_stages": job.num_stages})


def _loop_ops(sass: str) -> list[str]:
    """The opcodes of the longest loop of a SASS listing: the k-loop, one k-tile per trip."""
    ins = [(int(a, 16), text.strip())
           for a, text in re.findall(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", sass)]
    loops = [(int(t.split()[-1], 16), a) for a, t in ins
             if "BRA" in t and int(t.split()[-1], 16) < a]
    if not loops:
        return []
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    return [t.split()[1] if t.startswith("@") else t.split()[0] for a, t in ins if lo <= a <= hi]


def _sass_loop(sass: str) -> tuple[int, int, int]:
    """(instructions, barriers, global loads) in the k-loop."""
    ops = _loop_ops(sass)
    return (len(ops), sum(op.startswith("BAR") for op in ops),
            sum(op.startswith("LDG") for op in ops))


def _sass(compiled: Any, flag: str = "-sass") -> str:
    """cuobjdump's listing of the compiled kernel ('' where there is no cuobjdump)."""
    import subprocess
    import tempfile

    from triton import knobs

    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            return subprocess.run([knobs.nvidia.cuobjdump.path, flag, f.name],
                                  capture_output=True, text=True, timeout=60).stdout
    except Exception:  # noqa: BLE001 -- best effort
        return ""


def shared_in_loop(sass: str) -> list[str]:
    """GEMV v4's k-loop must not touch shared memory (no layout conversion, no barrier): the
    opcodes that do, if any (Triton may keep a conversion in its IR that moves no data)."""
    return sorted({op for op in _loop_ops(sass) if op.split(".")[0] in (
        "BAR", "STS", "LDS", "STSM", "LDSM")})


def asm_summary(compiled: Any) -> str:
    """Registers, spills (ptxas' stack/local bytes), shared memory, a few PTX counts, and the
    k-loop's SASS: instructions per warp per k-tile, CTA barriers, global loads."""
    ptx = compiled.asm.get("ptx", "")
    n_async = len(re.findall(r"cp\.async\.c[ag]", ptx))
    text = (f"smem={compiled.metadata.shared}B cp.async={n_async} "
            f"wgmma={ptx.count('wgmma.mma_async')} mma.sync={ptx.count('mma.sync')}")
    use = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", _sass(compiled, "-res-usage")))
    sass = _sass(compiled)
    if use and sass:
        n, bars, ldg = _sass_loop(sass)
        text = (f"regs={use['REG']} stack={use['STACK']} local={use['LOCAL']} {text} "
                f"loop: {n} instr {bars} BAR {ldg} LDG")
    return text


def _probe_kernel(out_ptr):
    """The smallest kernel: whether this triton can compile for the target here at all."""
    tl.store(out_ptr + tl.arange(0, 16), tl.zeros((16,), dtype=tl.float32))


# what the forked workers compile: set by main() before the pool starts
_WORK: dict[str, Any] = {}


def _run(index: int) -> tuple[int, bool, str]:
    """Compile job ``index`` (-1: the probe): (index, ok, report)."""
    t = time.perf_counter()
    try:
        if index < 0:
            import triton
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource

            src = ASTSource(_WORK["probe"], {"out_ptr": "*fp32"}, {}, {})
            triton.compile(src, target=GPUTarget("cuda", _WORK["arch"], 32))
            return index, True, "probe"
        job = _WORK["jobs"][index]
        compiled = compile_job(job, _WORK["kernels"], _WORK["arch"])
    except Exception as e:  # noqa: BLE001 -- report every failing config
        lines = str(e).strip().splitlines()
        return index, False, f"{type(e).__name__}: {lines[-1] if lines else ''}"
    if job.kernel == "gemv4" and (ops := shared_in_loop(_sass(compiled))):
        return index, False, f"shared memory in GEMV v4's k-loop: {' '.join(ops)}"
    extra = f" {asm_summary(compiled)}" if _WORK["asm"] else ""
    return index, True, f"{time.perf_counter() - t:.1f}s{extra}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 80")
    ap.add_argument("--quick", action="store_true", help="one compile per tile config")
    ap.add_argument("--variant", action="append", metavar="OPTS",
                    help="backend options as in a spec, e.g. 'kernel=mma,block_k=64' or '' "
                         f"for the heuristic (repeatable; default: {list(VARIANTS)})")
    ap.add_argument("--asm", action="store_true", help="summarize each compiled kernel")
    ap.add_argument("--m", default=",".join(map(str, SWEEP_M)),
                    help="token counts M to pick tiles for (comma separated; default: the "
                         "sweep's)")
    ap.add_argument("--kernel-file", type=Path, default=KERNEL_FILE,
                    help="another copy of triton_nf4.py, to compare versions")
    ap.add_argument("-j", "--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="compiler processes (default: up to 8)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    try:
        import triton
        import triton.language
    except ImportError as e:
        print(f"SKIP: triton is not importable: {e}")
        return 2
    global tl
    tl = triton.language
    ns = load(tl, args.kernel_file.resolve())
    todo = jobs(ns, ms=tuple(int(v) for v in args.m.split(",")), quick=args.quick,
                variants=VARIANTS if args.variant is None else tuple(args.variant))
    _WORK.update(jobs=list(todo), arch=args.arch, asm=args.asm,
                 probe=triton.jit(_probe_kernel),
                 kernels={"gemv": triton.jit(ns["_nf4_gemv_kernel"]),
                          "gemv4": triton.jit(ns["_nf4_gemv4_kernel"]),
                          "mma": triton.jit(ns["_nf4_mma_kernel"]),
                          "dequant": triton.jit(ns["_nf4_dequant_kernel"]),
                          "reduce": triton.jit(ns["_nf4_splitk_reduce"])})
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(todo)} compilations", flush=True)
    t0 = time.perf_counter()
    # Forked workers (nothing compiled in this process before the fork); a compiler crash
    # that takes its worker down fails the configs still pending instead of the whole run.
    ctx = multiprocessing.get_context("fork")
    done: dict[int, tuple[bool, str]] = {}
    with cf.ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx) as pool:
        _, ok, report = pool.submit(_run, -1).result()
        if not ok:
            print(f"SKIP: triton {triton.__version__} cannot compile for sm_{args.arch} here: "
                  f"{report}")
            return 2
        futures = [pool.submit(_run, i) for i in range(len(todo))]
        for i, future in enumerate(futures):
            try:
                _, ok, report = future.result()
            except cf.process.BrokenProcessPool:
                ok, report = False, "the compiler process died"
            done[i] = ok, report
            job, uses = _WORK["jobs"][i], todo[_WORK["jobs"][i]]
            if not ok:
                variant, m, n, k = uses[0]
                print(f"FAIL {job.describe()} (e.g. triton-nf4[{variant}] m={m} n={n} k={k}; "
                      f"{len(uses)} uses): {report}", flush=True)
            elif args.verbose or args.asm:
                print(f"ok   {job.describe()} {report}", flush=True)
    failed = sum(not ok for ok, _ in done.values())
    print(f"{len(todo) - failed}/{len(todo)} compiled in {time.perf_counter() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
