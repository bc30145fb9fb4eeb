#!/usr/bin/env bash
# The regression gate on a real GPU: ci-smoke twice (the rerun must pass), then once more with
# a deliberately slower Triton NF4 kernel (its tuned table at each bucket's median candidate,
# as a careless retune would ship: scripts/slow_nf4_table.py), which must fail naming those
# points. Run folders go to $GATE (default
# /tmp/gate), then one archive $OUT/gate.tar.gz (the device tool returns at most 8 files).
#   bash scripts/gpu_gate_demo.sh        (on the GPU machine, PYTHONPATH with bitsandbytes+vLLM)
set -uo pipefail
export PYTHONUNBUFFERED=1
SUITE=bench/ci-smoke.toml
G=${GATE:-/tmp/gate}
mkdir -p "$G"
for pass in a b; do
  start=$(date +%s)
  python3 -m dqprof bench --suite $SUITE -o "$G/smoke-$pass" 2> "$G/smoke-$pass.err" | tail -1
  echo "ci-smoke $pass: $(( $(date +%s) - start )) s wall"
done
python3 -m dqprof regress --baseline "$G/smoke-a" --current "$G/smoke-b" \
  --summary "$G/rerun-summary.md" --junit "$G/rerun-junit.xml" | tail -4
echo "rerun gate exit ${PIPESTATUS[0]}"
cat profiles/h200/session7/nf4-tune.log.jsonl profiles/h200/session8/nf4-tune.log.jsonl \
  > "$G/tune-logs.jsonl"  # its median candidates: a correct kernel, ~1.6-4x slower at M <= 16
python3 scripts/slow_nf4_table.py "$G/tune-logs.jsonl" "$G/slow-h200.json" > "$G/slow-h200.txt"
head -1 "$G/slow-h200.txt"
DQPROF_NF4_CONFIG="$G/slow-h200.json" python3 -m dqprof bench --suite $SUITE \
  --backends triton-nf4 -o "$G/smoke-slow" 2> "$G/smoke-slow.err" | tail -1
python3 -m dqprof regress --baseline "$G/smoke-a" --current "$G/smoke-slow" \
  --summary "$G/slow-summary.md" --junit "$G/slow-junit.xml" | tail -12
echo "slow gate exit ${PIPESTATUS[0]}"
tar -C "$G" -czf "$OUT/gate.tar.gz" .
