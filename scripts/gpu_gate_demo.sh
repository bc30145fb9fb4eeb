#!/usr/bin/env bash
# The regression gate on a real GPU: ci-smoke twice (the rerun must pass), then once more with
# a deliberately slower Triton NF4 kernel (decode tiles made narrow and unpipelined, as a bad
# kernel PR would), which must fail naming those points. Run folders go to $GATE (default
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
k=dqprof/kernels/triton_nf4.py
cp $k /tmp/triton_nf4.py.orig
sed -i -e 's/bm, bk, stages = 16, 128, 4/bm, bk, stages = 16, 32, 1/' \
       -e 's/bn = 128 if m > 8 or _cdiv(n, 128) >= target else 64/bn = 16/' $k
python3 -m dqprof bench --suite $SUITE --backends triton-nf4 -o "$G/smoke-slow" \
  2> "$G/smoke-slow.err" | tail -1
cp /tmp/triton_nf4.py.orig $k
python3 -m dqprof regress --baseline "$G/smoke-a" --current "$G/smoke-slow" \
  --summary "$G/slow-summary.md" --junit "$G/slow-junit.xml" | tail -12
echo "slow gate exit ${PIPESTATUS[0]}"
tar -C "$G" -czf "$OUT/gate.tar.gz" .
