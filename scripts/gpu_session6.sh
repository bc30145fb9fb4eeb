#!/usr/bin/env bash
# The next GPU session's batch (30 min of device time): validate the thread-read, period-grid
# energy window, then regenerate profiles/h200/ with it. One step per call, in this order; the
# vLLM bundle (../shared/device/stage-gpu-deps --vllm, re-split into 55 MB parts) travels with
# the first three calls. The sweep folder runs/h200 is git-ignored, so it stays on the warm
# machine between calls and every call resumes it; each call also sends it back under $OUT.
#   A (carry part_00): GPU tests of the energy window; energy check of the paths without
#     vLLM (bf16, tinygemm-int4, triton-nf4): idle share, precision reached, window length,
#     back-to-back repeat spread and how often it lies within the stated precision
#     (scripts/gpu_energy_check.py, ~2 min)
#   B (carry part_01): triton-nf4's GEMV decode A/B (scripts/gpu_nf4_ab.sh: its GPU tests
#     gate which decodes are timed, ~4 min)
#   C (carry part_02 + unpack.sh): energy check with Marlin and Machete (vLLM), then the
#     default sweep of every path into runs/h200 (1440 points)
#   D, E ...: `bash scripts/gpu_session6.sh sweep` until the sweep reports nothing left
#     (`--resume` keeps every point already measured)
# Then: commit runs/h200/{kernels.jsonl,run.json} to profiles/h200/ unedited with this
# command beside it, regenerate README's headline and docs/h200-report from it.
# If B shows a v4 decode faster and correct, make it the default before the sweep (C) so the
# profile holds it. Full-model runs (dqprof model run, incl. dqprof_nf4 and fp8) need another
# session's device time: they are not in this batch.
#   bash scripts/gpu_session6.sh A|B|C|sweep
set -uo pipefail
export PYTHONPATH=${GPU_SITE:-/tmp/gpu-site}:$PWD PYTHONUNBUFFERED=1
RUN=runs/h200
STEP_S=${STEP_S:-540}  # leave the call's 600 s limit room to pack up
mkdir -p "$RUN"
nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,temperature.gpu --format=csv

sweep() {  # the default sweep, resumed; stops itself before the call's limit
  local backends=$1 t0; t0=$(date +%s)
  timeout "$STEP_S" python3 -m dqprof bench ${backends:+--backends "$backends"} -o "$RUN" \
    --resume > "$OUT/sweep.log" 2>&1
  echo "sweep rc=$? $(( $(date +%s) - t0 )) s"; tail -4 "$OUT/sweep.log"
  python3 - "$RUN/kernels.jsonl" <<'PY'
import collections, json, statistics, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
ok = [r for r in recs if r["status"] == "ok"]
by = collections.Counter((r["backend"], r["status"]) for r in recs)
print(len(recs), "records;", dict(by))
for phase in ("timing", "capture", "check", "attribution", "energy"):
    vals = [r["wall_s"][phase] for r in ok if phase in (r.get("wall_s") or {})]
    if vals:
        print(f"{phase:12s} median {statistics.median(vals):.3f} s  total {sum(vals):.0f} s")
e = [r["energy"] for r in ok if r.get("energy") and r["energy"].get("j_per_call")]
if e:
    print("metered", len(e), "of", len(ok), "| window median",
          round(statistics.median(x["window_s"] for x in e), 3), "s | precision median",
          round(statistics.median(x["precision"] for x in e if x.get("precision")), 4),
          "| stops", dict(collections.Counter(x["stop"] for x in e)),
          "| on grid", sum(bool(x.get("tick_fit")) for x in e),
          "| flagged", sum(bool(x.get("flag")) for x in e))
PY
  tar -C runs -czf "$OUT/h200-run.tar.gz" h200
}

case "${1:-}" in
A)
  timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py \
    > "$OUT/gpu-tests.log" 2>&1; echo "gpu tests rc=$?"; tail -3 "$OUT/gpu-tests.log"
  DQPROF_CHECK_BACKENDS=bf16,tinygemm-int4,triton-nf4 timeout 300 \
    python3 scripts/gpu_energy_check.py > "$OUT/energy-check-a.log" 2>&1
  echo "energy check rc=$?"; tail -8 "$OUT/energy-check-a.log"
  tar -czf "$OUT/energy-check-a.tar.gz" -C "$OUT" energy-check && rm -rf "$OUT/energy-check" ;;
B)
  bash scripts/gpu_nf4_ab.sh ;;
C)
  python3 -c "import vllm, bitsandbytes, gemlite; print('vllm', vllm.__version__, 'bnb', bitsandbytes.__version__)" 2>&1 | tail -1
  timeout 200 python3 scripts/gpu_energy_check.py > "$OUT/energy-check-c.log" 2>&1
  echo "energy check rc=$?"; tail -6 "$OUT/energy-check-c.log"
  tar -czf "$OUT/energy-check-c.tar.gz" -C "$OUT" energy-check && rm -rf "$OUT/energy-check"
  STEP_S=360 sweep "" ;;
sweep)
  sweep "" ;;
*)
  echo "usage: bash scripts/gpu_session6.sh A|B|C|sweep" >&2; exit 2 ;;
esac
ls -la "$OUT"
