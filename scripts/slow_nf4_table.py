"""A deliberately worse tuned table for triton-nf4: the CI gate's "slowed path" demo.

Each entry of the bundled table gets, instead of its best config, the config at QUANTILE of the
times a tune measured for that (layer, M) (0.5: the median candidate, a regression a careless
retune could ship; 1.0: the slowest). Every such config passed the tune's fp32 check, so the
kernel stays correct and only its speed changes; a table entry the log has no timings for is
kept. Point ``DQPROF_NF4_CONFIG`` at the output to run the slowed kernel:

    python3 scripts/slow_nf4_table.py profiles/h200/session7/nf4-tune.log.jsonl /tmp/slow.json
    DQPROF_NF4_CONFIG=/tmp/slow.json dqprof bench --suite bench/ci-smoke.toml ...
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "dqprof" / "kernels" / "configs" / "h200.json"


def slowed(table: dict, log_lines: list[dict], quantile: float) -> tuple[dict, list[str]]:
    timed: dict[tuple[int, int, int], list[tuple[float, dict]]] = defaultdict(list)
    for r in log_lines:
        if r.get("status") == "ok":
            timed[(r["n"], r["k"], r["m"])].append((r["median_s"], r["config"]))
    entries, said = [], []
    for e in table["entries"]:
        cands = sorted(timed.get((e["n"], e["k"], e["m_max"]), ()), key=lambda c: c[0])
        if not cands:
            entries.append(e)
            continue
        t, cfg = cands[min(len(cands) - 1, int(quantile * (len(cands) - 1) + 0.5))]
        entries.append({**e, "config": cfg, "median_s": t})
        said.append(f"{e['layer']} m<={e['m_max']}: {e['median_s'] * 1e6:.1f} -> "
                    f"{t * 1e6:.1f} us ({t / e['median_s']:.2f}x)")
    return {**table, "entries": entries, "slowed": {"quantile": quantile}}, said


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path, help="a tune's log (nf4-tune.log.jsonl)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--table", type=Path, default=BUNDLED)
    ap.add_argument("--quantile", type=float, default=0.5)
    a = ap.parse_args()
    lines = [json.loads(ln) for ln in a.log.read_text().splitlines() if ln.strip()]
    table, said = slowed(json.loads(a.table.read_text()), lines, a.quantile)
    a.out.write_text(json.dumps(table, indent=1))
    print(f"{a.out}: {len(said)} of {len(table['entries'])} entries slowed")
    print("\n".join(said))


if __name__ == "__main__":
    main()
