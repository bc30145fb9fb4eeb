"""Helpers of scripts/gpu_nf4_ab.sh (the triton-nf4 GEMV decode A/B on the GPU machine).

    python3 scripts/nf4_ab.py passed TESTS.xml SPEC...        the specs whose decode passed
    python3 scripts/nf4_ab.py table KERNELS.jsonl... [--specs SPEC,...] [--energy]
                                                              one table of µs (and mJ)

``passed`` reads pytest's JUnit XML of ``-m gpu tests/test_triton_nf4.py`` and prints, comma
separated, the given backend specs except triton-nf4 ones whose decode had a failing or
erroring test (a test names its decode in its id: ``decode=shfl``, ``[shfl-...]``; no decode
named is the default, GEMV v3's ``table``); if the XML is missing (the tests did not run to
the end) it keeps them all, with a warning: the bench still checks each point against the
fp32 reference before timing it. ``table`` prints one row per (layer, M) and one
column per spec from bench records (heads shortened: ``nf4[bn16,shfl]`` is
``triton-nf4[block_n=16,decode=shfl]``; median µs; ``fail`` where the bench's own fp32 check
failed, blank where not run; ``--energy``: "µs (mJ per call)"), then each triton-nf4 spec's
geometric-mean speed-up over the default triton-nf4 per M.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

DECODES = ("table4", "shfl", "table")  # longest first: "table4" contains "table"


def decode_of(text: str) -> str:
    """The GEMV decode a spec or a test id names (the default, ``table``, if none)."""
    for d in DECODES:
        if re.search(rf"(decode=|\[|-){d}(\]|-|,|$)", text):
            return d
    return "table"


def failed_decodes(xml_path: Path) -> set[str] | None:
    """Decodes with a failing or erroring test; None if the XML is missing or unreadable."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    bad = set()
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            bad.add(decode_of(case.get("name", "")))
    return bad


def passed(xml_path: Path, specs: list[str]) -> list[str]:
    bad = failed_decodes(xml_path)
    if bad is None:
        print(f"no test results in {xml_path}: every spec goes to the bench, whose own fp32 "
              "check still keeps a wrong point from being timed", file=sys.stderr)
        bad = set()
    keep = []
    for spec in specs:
        if spec.startswith("triton-nf4") and decode_of(spec) in bad:
            print(f"not timed (GPU tests failed for its decode): {spec}", file=sys.stderr)
            continue
        keep.append(spec)
    return keep


def _label(record: dict) -> str:
    variant = record.get("variant") or ""
    return record["backend"] + (f"[{variant}]" if variant else "")


def _canonical(spec: str) -> str:
    """A spec as the bench labels its records (options sorted, as Backend.variant sorts)."""
    if "[" not in spec:
        return spec
    name, opts = spec[:-1].split("[", 1)
    return f"{name}[{','.join(sorted(filter(None, opts.split(','))))}]"


def _short(label: str) -> str:
    """A column head: triton-nf4[block_n=16,decode=shfl] -> nf4[bn16,shfl]."""
    for long, short in (("triton-nf4", "nf4"), ("tinygemm-int4", "tinygemm"), ("decode=", ""),
                        ("block_n=", "bn"), ("stats=", "")):
        label = label.replace(long, short)
    return label


def table(paths: list[Path], specs: list[str] | None, energy: bool = False) -> str:
    cells: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
    times: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    seen: list[str] = []
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            label, key = _label(r), (r["layer"], r["m"])
            if label not in seen:
                seen.append(label)
            if r["status"] == "ok":
                t = r["time"]["median_s"] * 1e6
                cells[key][label], times[key][label] = f"{t:.2f}", t
                j = (r.get("energy") or {}).get("j_per_call")
                if energy:
                    cells[key][label] += f" ({j * 1e3:.3g})" if j is not None else " (-)"
            elif r["status"] == "failed":
                cells[key][label] = "fail"
    cols = [_canonical(s) for s in specs] if specs else seen
    heads = [_short(c) for c in cols]
    width = max(9, *(len(h) for h in heads))
    out = [f"{'layer':32s} {'m':>4s} " + " ".join(f"{h:>{width}s}" for h in heads)]
    for key in sorted(cells):
        out.append(f"{key[0]:32s} {key[1]:4d} "
                   + " ".join(f"{cells[key].get(c, ''):>{width}s}" for c in cols))
    base = "triton-nf4"
    out.append(f"\ngeometric-mean speed-up over {base} (default decode) per M, over the layers "
               "both ran:")
    for c in cols:
        if not c.startswith("triton-nf4") or c == base:
            continue
        per_m = defaultdict(list)
        for (_, m), t in times.items():
            if c in t and base in t:
                per_m[m].append(math.log(t[base] / t[c]))
        parts = [f"M={m}: {math.exp(sum(v) / len(v)):.2f}x" for m, v in sorted(per_m.items())]
        out.append(f"  {_short(c)}: {', '.join(parts) or 'no common points'}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("passed")
    p.add_argument("xml", type=Path)
    p.add_argument("specs", nargs="+")
    t = sub.add_parser("table")
    t.add_argument("jsonl", type=Path, nargs="+")
    t.add_argument("--specs", default="", help="column order (default: as first seen)")
    t.add_argument("--energy", action="store_true", help="each cell: µs (mJ per call)")
    args = ap.parse_args(argv)
    if args.cmd == "passed":
        print(",".join(passed(args.xml, args.specs)))
    else:
        print(table([p for p in args.jsonl if p.exists()],
                    [s for s in re.split(r",(?![^\[]*\])", args.specs) if s] or None,
                    args.energy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
