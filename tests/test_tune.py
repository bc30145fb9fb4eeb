"""`dqprof tune`: the candidates it times and its bad input (the timing itself needs a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dqprof.kernels.triton_nf4 import DEQUANT_MIN_M, heuristic_config
from dqprof.tune import candidates

SHAPES = ((20480, 2560), (2560, 10240), (3072, 2560), (256, 2560), (2560, 256))


@pytest.mark.parametrize("m", (1, 2, 4, 8, 16, 64, 256, 4096))
@pytest.mark.parametrize("n, k", SHAPES)
def test_candidates_are_valid_tiles(m: int, n: int, k: int) -> None:
    cands = candidates(m, n, k, 132)
    assert cands[0] == heuristic_config(m, n, k, 132)  # the heuristic is timed first
    assert len(cands) == len(set(cands))
    for c in cands:
        assert k % c.block_k == 0 and (k // c.block_k) % c.split_k == 0
        if c.kernel == "gemv" and c.decode == "table":  # v3: every row in one program
            assert m <= 4 and c.block_m >= m
        elif c.kernel == "dequant":  # beyond M = 4, no tiles; the heuristic's from 17
            assert m > 4 and (c == cands[0]) == (m >= DEQUANT_MIN_M)
        elif c.kernel == "gemv":  # v4: row groups of up to 4 rows
            assert m <= 16 and c.block_m == min(4, 1 << (m - 1).bit_length())
        else:  # wgmma's M is the weight tile: 64 rows per warpgroup
            assert c.block_n >= 64 and c.block_m >= 16
    kernels = {c.kernel for c in cands}
    assert kernels == ({"gemv", "mma"} if m <= 4 else {"gemv", "mma", "dequant"}
                       if m < DEQUANT_MIN_M else {"mma", "dequant"})


def _tune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dqprof", "tune", *args], capture_output=True,
                          text=True, timeout=120)


def test_tune_takes_only_triton_nf4() -> None:
    proc = _tune("bf16", "-o", "/tmp/x.json")
    assert proc.returncode == 2 and "takes triton-nf4" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_tune_without_a_gpu_says_so() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    proc = _tune("triton-nf4", "-o", "/tmp/x.json", "--m", "1")
    assert proc.returncode == 3 and "needs a CUDA GPU" in proc.stderr


@pytest.mark.parametrize("m", (1, 2, 4, 8))
def test_candidates_search_the_decodes_asked_for(m: int) -> None:
    n, k = 20480, 2560
    decodes = {c.decode for c in candidates(m, n, k, 132) if c.kernel == "gemv"}
    assert decodes == ({"table", "table4", "shfl"} if m <= 4 else {"table4", "shfl"})
    only_v3 = {c.decode for c in candidates(m, n, k, 132, ("table",)) if c.kernel == "gemv"}
    assert only_v3 == ({"table"} if m <= 4 else set())
    both = candidates(m, n, k, 132, ("table", "shfl"))
    shfl = [c for c in both if c.decode == "shfl" and c.kernel == "gemv"]
    assert len(shfl) > 0
    assert all(c.block_m <= 4 and k % c.block_k == 0 for c in shfl)
    # beyond 4 rows the MMA is timed with either decode
    mma = {c.decode for c in both if c.kernel == "mma"}
    assert mma == ({"table"} if m <= 4 else {"table", "shfl"})


def test_tune_rejects_unknown_decodes() -> None:
    proc = _tune("triton-nf4", "-o", "/tmp/x.json", "--decodes", "table,lut")
    assert proc.returncode == 2 and "--decodes takes some of" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_partial_tune_keeps_the_rest_of_the_table() -> None:
    from dqprof.tune import merge

    def entry(n: int, k: int, m_max: int, us: float) -> dict:
        return {"layer": "x", "n": n, "k": k, "m_max": m_max, "config": {}, "median_s": us}

    old = {"schema": 1, "gpu": "NVIDIA H200", "created": "2026-12-02T00:43:45+00:00",
           "entries": [entry(20480, 2560, 1, 16e-6), entry(20480, 2560, 2, 19e-6),
                       entry(2560, 10240, 1, 12e-6)]}
    new = {"schema": 1, "gpu": "NVIDIA H200", "entries": [entry(20480, 2560, 1, 14e-6)]}
    out = merge(new, old)
    assert [(e["n"], e["m_max"], e["median_s"]) for e in out["entries"]] == [
        (2560, 1, 12e-6), (20480, 1, 14e-6), (20480, 2, 19e-6)]
    assert out["kept"]["entries"] == 2
    assert merge(new, {**old, "gpu": "NVIDIA H100"}) is new  # another GPU's: not mixed in
    assert merge(new, None) is new


def test_the_gate_demos_slowed_table_is_valid_and_slower() -> None:
    """scripts/slow_nf4_table.py (the gate demo's regression): each bucket takes a config the
    committed tune logs timed slower than the bundled best, and the kernel takes it as given."""
    import importlib.util

    from dqprof.kernels import tuned
    from dqprof.kernels.triton_nf4 import TritonNf4, tile_config

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("slow", root / "scripts" / "slow_nf4_table.py")
    slow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slow)
    logs = [json.loads(ln) for s in ("session7", "session8")
            for ln in (root / "profiles/h200" / s / "nf4-tune.log.jsonl").read_text().split("\n")
            if ln.strip()]
    best = json.loads(slow.BUNDLED.read_text())
    table, said = slow.slowed(best, logs, 0.5)
    assert len(said) == len(best["entries"])  # the logs cover every bundled bucket
    for old, new in zip(best["entries"], table["entries"], strict=True):
        assert new["median_s"] >= old["median_s"] and new["config"] != old["config"]
    parsed = tuned.parse_table(table, "slow.json")
    for (n, k), rows in parsed.entries.items():
        for m_max, _ in rows:
            cfg = parsed.lookup(m_max, n, k)
            assert tile_config(m_max, n, k, 132, TritonNf4.options, parsed) == cfg
