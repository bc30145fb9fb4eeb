#!/usr/bin/env bash
# triton-nf4 kernel work on the GPU machine, one call: tune the tile table, then time the tuned
# kernel beside bf16 and tinygemm (no energy: a development pass). Results under $OUT.
#   bash scripts/gpu_nf4.sh [M buckets]        (on the GPU machine, from the repo root)
set -uo pipefail
export PYTHONPATH=${GPU_SITE:-/tmp/gpu-site}:$PWD PYTHONUNBUFFERED=1
M=${1:-1,2,4,8,16}
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
t0=$(date +%s)
python3 -m dqprof tune triton-nf4 -o "$OUT/h200.json" --m "$M" > "$OUT/tune.txt" 2> "$OUT/tune.err"
echo "tune rc=$? $(( $(date +%s) - t0 )) s"; tail -n 80 "$OUT/tune.txt"
t1=$(date +%s)
DQPROF_NF4_CONFIG=$OUT/h200.json python3 -m dqprof bench --no-energy --no-attribution \
  --backends "bf16,tinygemm-int4,triton-nf4,triton-nf4[stats=fp16]" --m "$M" -o /tmp/nf4-bench \
  > "$OUT/bench.txt" 2> "$OUT/bench.err"
echo "bench rc=$? $(( $(date +%s) - t1 )) s"
cp /tmp/nf4-bench/kernels.jsonl "$OUT/bench-kernels.jsonl" 2>/dev/null
python3 - <<'PY'
import json, collections, os
rows = collections.defaultdict(dict)
for line in open("/tmp/nf4-bench/kernels.jsonl"):
    r = json.loads(line)
    if r["status"] == "ok":
        rows[(r["layer"], r["m"])][r["backend"] + (f"[{r['variant']}]" if r["variant"] else "")] = r["time"]["median_s"] * 1e6
    elif r["status"] == "failed":
        print("FAILED", r["layer"], r["m"], r["backend"], r["variant"], r.get("reason", "")[:200])
cols = ["bf16", "tinygemm-int4", "triton-nf4", "triton-nf4[stats=fp16]"]
print(f"{'layer':30s} {'m':>5s} " + " ".join(f"{c[:14]:>14s}" for c in cols))
for (layer, m), d in sorted(rows.items()):
    print(f"{layer:30s} {m:5d} " + " ".join(f"{d.get(c, float('nan')):14.2f}" for c in cols))
PY
ls -la "$OUT"
