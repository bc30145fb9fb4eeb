#!/usr/bin/env bash
# One GPU session of dqprof on the lent H200: environment, GPU tests, then sweeps, with every
# result written under $OUT as it is produced. Usage (on the GPU machine, repo root):
#   RUN_DIR=runs/h200 bash scripts/gpu_session.sh <seconds for the sweep> <bench args...>
# The sweep runs under `timeout`; a cut sweep is resumed in the next call with --resume
# (carry the run folder back). Deps: PYTHONPATH=/tmp/gpu-site (see ../shared/device/GPU.md).
set -uo pipefail
budget=${1:-400}; shift || true
export PYTHONPATH=/tmp/gpu-site:$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*"; }
if [[ ! -f "$OUT/env.json" && "${SKIP_ENV:-0}" != 1 ]]; then
  nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -m dqprof env > "$OUT/env.json" 2> "$OUT/env.err" || cat "$OUT/env.err"
fi
if [[ "${RUN_GPU_TESTS:-0}" == 1 ]]; then
  log "gpu tests"
  # the full-model GPU tests start vLLM engines (minutes): scripts/gpu_fullmodel.sh runs them
  timeout 300 python3 -m pytest -m gpu -q --no-header -p no:cacheprovider tests \
    --ignore tests/test_fullmodel_gpu.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
    | tee "$OUT/gpu-tests${TESTS_K:+-$TESTS_K}.log" | tail -25
fi
if [[ $# -gt 0 ]]; then
  log "bench $*"
  start=$(date +%s)
  # USR1 8 s before the end: dqprof prints every thread's stack to bench.err (where a cut
  # sweep was), then KILL at the budget
  timeout --signal=USR1 --kill-after=8 "$(( budget > 16 ? budget - 8 : budget ))" \
    python3 -m dqprof bench -v -o "$RUN_DIR" "$@" 2>> "$OUT/bench.err"
  rc=$?
  log "bench exit $rc after $(( $(date +%s) - start )) s"
  tail -c 3000 "$OUT/bench.err"
  mkdir -p "$OUT/run" && cp "$RUN_DIR"/run.json "$RUN_DIR"/kernels.jsonl "$OUT/run/" 2>/dev/null
  python3 - "$RUN_DIR" <<'PY'
import collections, json, sys
recs = [json.loads(l) for l in open(sys.argv[1] + "/kernels.jsonl") if l.endswith("\n")]
print(len(recs), "records", collections.Counter(r["status"] for r in recs))
for r in recs:
    if r["status"] == "failed":
        print("FAILED", r["key"], r["reason"][:200])
PY
  exit $rc
fi
