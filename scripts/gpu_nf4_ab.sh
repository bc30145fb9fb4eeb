#!/usr/bin/env bash
# triton-nf4 GEMV decode A/B on the GPU machine, one call (about 3-4 minutes, not yet run): GEMV
# v3 (the default, decode=table) against GEMV v4's decodes (table4, shfl, shfl at three tile
# widths, shfl on plain fp16 statistics) beside bf16 and tinygemm-int4, on every Gemma 4 E4B
# shape, no energy. First the static SASS counts (this machine's toolchain), then the GPU tests: a
# decode with a failing test is not timed. At M = 8, 16 the heuristic takes the MMA kernel,
# which has one decode, so only bf16, tinygemm-int4 and triton-nf4 are timed there.
#   bash scripts/gpu_nf4_ab.sh            (on the GPU machine, from the repo root; results in $OUT)
set -uo pipefail
export PYTHONPATH=${GPU_SITE:-/tmp/gpu-site}:$PWD PYTHONUNBUFFERED=1
R=/tmp/nf4-ab; rm -rf "$R"; mkdir -p "$R"
BASE="bf16 tinygemm-int4 triton-nf4"
V4="triton-nf4[decode=table4] triton-nf4[decode=shfl] triton-nf4[decode=shfl,block_n=16]
triton-nf4[decode=shfl,block_n=32] triton-nf4[decode=shfl,block_n=64]
triton-nf4[decode=shfl,stats=fp16]"
nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,clocks.sm,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
git log --oneline -1 2>/dev/null || true
# worst case under the 600 s of one call: 60 + 150 + 270 + 60 s of timeouts

t0=$(date +%s)
timeout 60 python3 tests/triton_compile_check.py --quick --asm -j 12 \
  --variant "" --variant decode=table4 --variant decode=shfl --variant decode=shfl,stats=fp16 \
  > "$OUT/compile-asm.txt" 2>&1
echo "compile check rc=$? $(( $(date +%s) - t0 )) s"
grep -E "^ok +gemv" "$OUT/compile-asm.txt" | sort -u | head -40

t0=$(date +%s)
timeout 150 python3 -m pytest -q -m gpu tests/test_triton_nf4.py -p no:cacheprovider \
  --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.txt" 2>&1
echo "gpu tests rc=$? $(( $(date +%s) - t0 )) s"; tail -n 15 "$OUT/gpu-tests.txt"
# shellcheck disable=SC2086  # the spec lists split on whitespace
SPECS=$(python3 scripts/nf4_ab.py passed "$OUT/gpu-tests.xml" $BASE $V4)
echo "timed: $SPECS"

t0=$(date +%s)
timeout 270 python3 -m dqprof bench --no-energy --no-attribution --backends "$SPECS" \
  --m 1,2,4 -o "$R/decode" > "$OUT/bench-decode.txt" 2>&1
echo "bench M<=4 rc=$? $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
timeout 60 python3 -m dqprof bench --no-energy --no-attribution \
  --backends "$(python3 scripts/nf4_ab.py passed "$OUT/gpu-tests.xml" $BASE)" \
  --m 8,16 -o "$R/mma" > "$OUT/bench-mma.txt" 2>&1
echo "bench M=8,16 rc=$? $(( $(date +%s) - t0 )) s"
cat "$R/decode/kernels.jsonl" "$R/mma/kernels.jsonl" > "$OUT/kernels.jsonl" 2>/dev/null
python3 scripts/nf4_ab.py table "$OUT/kernels.jsonl" --specs "$SPECS" | tee "$OUT/table.txt"
ls -la "$OUT"
