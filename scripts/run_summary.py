"""A sweep's run folder in a few lines, for the GPU session batches' output tails.

    python3 scripts/run_summary.py runs/h200/kernels.jsonl

Records per (path, status), each phase's median and total seconds per point, and the energy
windows: how many were metered, their median length and precision, why they stopped, how many
sat on the counter's period grid and how many were flagged.
"""

from __future__ import annotations

import collections
import json
import statistics
import sys

PHASES = ("prepare", "check", "capture", "attribution", "timing", "energy")


def main(path: str) -> None:
    try:
        with open(path) as f:
            recs = [json.loads(line) for line in f]
    except OSError:
        sys.exit("no records yet")
    ok = [r for r in recs if r["status"] == "ok"]
    by = collections.Counter((r["backend"], r["status"]) for r in recs)
    print(len(recs), "records;", dict(by))
    for phase in PHASES:
        vals = [r["wall_s"][phase] for r in ok if phase in (r.get("wall_s") or {})]
        if vals:
            print(f"{phase:12s} median {statistics.median(vals):.3f} s  total {sum(vals):.0f} s")
    e = [r["energy"] for r in ok if r.get("energy") and r["energy"].get("j_per_call")]
    if e:
        precs = [x["precision"] for x in e if x.get("precision")]
        print("metered", len(e), "of", len(ok), "| window median",
              round(statistics.median(x["window_s"] for x in e), 3), "s | precision median",
              round(statistics.median(precs), 4) if precs else None,
              "| stops", dict(collections.Counter(x.get("stop") for x in e)),
              "| on grid", sum(bool(x.get("tick_fit")) for x in e),
              "| flagged", sum(bool(x.get("flag")) for x in e))


if __name__ == "__main__":
    main(sys.argv[1])
