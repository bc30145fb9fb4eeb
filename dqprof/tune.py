"""`dqprof tune triton-nf4`: measure tile candidates per shape and M bucket, keep the fastest.

For every quantized linear shape of the model and every M bucket (the bucket's largest M is
the one timed), each candidate config is checked against the fp32 reference first (a wrong
config is dropped, never timed) and then timed as the sweep times a point: a CUDA graph over
weight copies rotated past L2, median of back-to-back samples. The table written
(``dqprof/kernels/configs/<gpu>.json`` by default) is what ``triton-nf4`` reads at prepare
time; every candidate's time goes to a JSON-lines log beside it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from dqprof.errors import DqprofError
from dqprof.kernels.triton_nf4 import DECODES

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
L2_FACTOR = 3.0  # rotated copies hold this many times the L2 size (the sweep's rule)
REPEATS = 9


def candidates(m: int, n: int, k: int, sms: int,
               decodes: tuple[str, ...] = DECODES) -> list[Any]:
    """The heuristic's config first, then the alternatives worth timing at this M: tile width
    and depth around the heuristic's, split-K halved and doubled, and at M <= 16 both kernels:
    each GEMV decode in ``decodes`` (v3's at M <= 4 only: beyond, it compiled to more
    instructions per weight than the MMA needs; v4's in row groups of up to 4 rows), and
    beyond M = 4 every MMA tile with each of its other decodes asked for too (shfl, shfl1,
    direct), and the dequantize path (the heuristic's, first, from DEQUANT_MIN_M)."""
    from dqprof.kernels.triton_nf4 import (
        AUTO_DECODE,
        GEMV_MAX_M,
        MMA_ONLY_DECODES,
        TileConfig,
        _divisor_block_k,
        auto_decode,
        heuristic_config,
    )

    # the heuristic first: what an untuned call runs (its decode, where it is searched)
    gemv = [d for d in decodes if d not in MMA_ONLY_DECODES] or ["table"]
    base = heuristic_config(m, n, k, sms, decode=auto_decode(m) if auto_decode(m) in gemv
                            else gemv[0])
    out = [base]
    # from DEQUANT_MIN_M the heuristic dequantizes (no tiles to vary): the MMA's tiles beside it
    mma_base = heuristic_config(m, n, k, sms, "mma") if base.kernel == "dequant" else base

    def splits(cfg: TileConfig) -> list[int]:
        k_tiles = k // cfg.block_k
        return sorted({s for s in (max(1, cfg.split_k // 2), cfg.split_k, cfg.split_k * 2, 1)
                       if k_tiles % s == 0 and (s == 1 or k_tiles // s >= 2)})

    def variants(cfg: TileConfig, widths: tuple[int, ...], depths: tuple[int, ...]) -> None:
        for bn, bk in itertools.product(widths, depths):
            if k % bk:
                continue
            c = replace(cfg, block_n=bn, block_k=bk,
                        num_warps=cfg.num_warps if cfg.kernel == "gemv" else
                        (4 if bn == 64 else 8))
            out.extend(replace(c, split_k=s) for s in splits(c))

    if m <= GEMV_MAX_M:
        for d in decodes:  # at two depths: 256 lets split-K fill the SMs where K / 512 is odd
            if d in MMA_ONLY_DECODES:
                continue
            depths = tuple(sorted({_divisor_block_k(k, 256), _divisor_block_k(k, 512)}))
            if d == "table" and m <= 4:
                variants(heuristic_config(m, n, k, sms, "gemv", d), (16, 32, 64), depths)
            elif d != "table":  # v4 beyond 4 rows: row groups of 4 (the weight re-read from L2)
                variants(heuristic_config(m, n, k, sms, "gemv", d), (16, 32, 64), depths)
            if d == AUTO_DECODE:  # 8 warps of the widest tile: more loads in flight an SM
                wide = replace(heuristic_config(m, n, k, sms, "gemv", d), block_n=64,
                               block_k=_divisor_block_k(k, 512), num_warps=8)
                out.extend(replace(wide, split_k=s) for s in splits(wide))
        variants(heuristic_config(m, n, k, sms, "mma"), (64, 128), (128, 256))
    elif m <= 64:
        variants(mma_base, (64, 128), (128, 256))
    else:
        for bm in (64, 128, 256):
            out.append(replace(mma_base, block_m=bm))
            out.append(replace(mma_base, block_m=bm, num_stages=4))
        out.append(replace(mma_base, block_n=64, num_warps=4))
    if m > 4:  # the MMA's shuffle decodes beside its table gather
        mma = [c for c in out if c.kernel == "mma"]
        out.extend(replace(c, decode=d) for d in ("shfl", *MMA_ONLY_DECODES) if d in decodes
                   for c in mma)
        out.append(heuristic_config(m, n, k, sms, "dequant"))  # the first already, from 17
    seen, unique = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def tune(model: str, shapes_filter: str | None, buckets: tuple[int, ...], stats: str,
         log_path: Path, progress: Callable[[int, int, str], None],
         decodes: tuple[str, ...] = DECODES,
         checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Time every candidate; return the table (also appending every timing to ``log_path``).
    Largest weights first; ``checkpoint`` gets the table so far after each M bucket, so an
    interrupted tune still leaves its finished buckets (the rest fall back to the heuristic)."""
    import torch

    from dqprof.kernels.triton_nf4 import TritonNf4, _sm_count, nf4_matmul, quantize_state
    from dqprof.measure.timing import Replay, time_replay
    from dqprof.models.config import load_config
    from dqprof.models.shapes import linear_shapes, select_shapes
    from dqprof.sweep import REL_TOL, rel_error

    if not torch.cuda.is_available():
        raise DqprofError("dqprof tune needs a CUDA GPU", exit_code=3)
    dev = torch.device("cuda")
    sms = _sm_count(dev)
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size or 50 << 20
    shapes = sorted((s for s in select_shapes(linear_shapes(load_config(model)), shapes_filter)
                     if s.quantized and s.k % 64 == 0), key=lambda s: -s.n * s.k)
    backend = TritonNf4(stats=stats, tuned=False)
    plan = [(s, m, candidates(m, s.n, s.k, sms, decodes)) for s in shapes for m in buckets]
    total, done = sum(len(c) for *_, c in plan), 0
    entries = []
    with open(log_path, "a") as log:
        for shape in shapes:
            gen = torch.Generator(device="cpu").manual_seed(0)
            w = (torch.randn(shape.n, shape.k, generator=gen) * 0.02).to(dev, torch.bfloat16)
            first = quantize_state(w, stats)
            del w
            copies = max(1, math.ceil(L2_FACTOR * l2 / backend.resident_bytes(shape)))
            states = [first] + [backend.clone(first) for _ in range(copies - 1)]
            ref = backend.reference(first)
            for s, m, cands in plan:
                if s is not shape:
                    continue
                x = torch.randn(m, shape.k, device=dev, dtype=torch.bfloat16)
                expected = x.float() @ ref.t()
                best = None
                for cfg in cands:
                    done += 1
                    progress(done, total, f"{shape.name} m={m} {_label(cfg)}")
                    rec = {"layer": shape.name, "n": shape.n, "k": shape.k, "m": m,
                           "config": asdict(cfg)}
                    try:
                        err = rel_error(nf4_matmul(first, x, cfg), expected)
                        if not err <= REL_TOL:
                            rec.update(status="failed", rel_err=err)
                        else:
                            fns = [lambda st=st, c=cfg, xx=x: nf4_matmul(st, xx, c)
                                   for st in states]
                            t = time_replay(Replay(fns, "cuda"), REPEATS)
                            rec.update(status="ok", rel_err=err, median_s=t.median_s,
                                       rel_spread=t.rel_spread)
                            if best is None or t.median_s < best[1]:
                                best = (cfg, t.median_s)
                    except Exception as e:  # a config that does not compile or launch
                        rec.update(status="failed", reason=f"{type(e).__name__}: {e}"[:300])
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if best is not None:
                    entries.append({"layer": shape.name, "n": shape.n, "k": shape.k,
                                    "m_max": m, "config": asdict(best[0]),
                                    "median_s": best[1]})
                    # after each bucket: a tune cut by a time limit keeps every bucket it ended
                    if checkpoint is not None:
                        checkpoint(_table(entries, dev, sms, stats, buckets, decodes))
                torch.cuda.synchronize()
            del states, first, ref
            torch.cuda.empty_cache()
    return _table(entries, dev, sms, stats, buckets, decodes)


def _table(entries: list[dict[str, Any]], dev: Any, sms: int, stats: str,
           buckets: tuple[int, ...], decodes: tuple[str, ...]) -> dict[str, Any]:
    """The table file's content. The config timed at a bucket's M serves every M above the
    previous bucket up to it; M past the last bucket falls back to the heuristic."""
    import torch

    return {"schema": 1, "gpu": torch.cuda.get_device_name(dev), "sms": sms,
            "stats": stats, "triton": _triton_version(), "torch": torch.__version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "buckets": list(buckets), "decodes": list(decodes),
            "entries": sorted(entries, key=lambda e: (e["n"], e["k"], e["m_max"]))}


def merge(table: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """``table`` plus the entries of ``previous`` (an earlier table of the same GPU) for the
    shapes and M buckets this tune did not time, so a tune of some layers refreshes them only."""
    if not previous or previous.get("gpu") != table["gpu"] or previous.get("schema") != 1:
        return table
    timed = {(e["n"], e["k"], e["m_max"]) for e in table["entries"]}
    kept = [e for e in previous.get("entries", ())
            if (e["n"], e["k"], e["m_max"]) not in timed]
    if not kept:
        return table
    entries = sorted(table["entries"] + kept, key=lambda e: (e["n"], e["k"], e["m_max"]))
    return {**table, "entries": entries,
            "kept": {"entries": len(kept), "created": previous.get("created"),
                     "triton": previous.get("triton")}}


def _label(cfg: Any) -> str:
    return (f"{cfg.kernel} {cfg.decode} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.split_k} "
            f"w{cfg.num_warps} st{cfg.num_stages}")


def _triton_version() -> str:
    import triton

    return triton.__version__


def summarize(log_path: Path) -> Iterator[dict[str, Any]]:
    """Per (layer, m): the heuristic's time, the best time and config (from the log)."""
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for line in Path(log_path).read_text().splitlines():
        r = json.loads(line)
        rows.setdefault((r["layer"], r["m"]), []).append(r)
    for (layer, m), recs in rows.items():
        ok = [r for r in recs if r["status"] == "ok"]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["median_s"])
        yield {"layer": layer, "m": m, "heuristic_s": recs[0].get("median_s"),
               "best_s": best["median_s"], "best": _label(_config(best["config"])),
               "failed": sum(r["status"] != "ok" for r in recs), "tried": len(recs)}


def _config(cfg: dict[str, Any]) -> Any:
    from dqprof.kernels.triton_nf4 import TileConfig

    return TileConfig(**cfg)
