#!/usr/bin/env bash
# The next session's GPU batch (30 min of device time), session 7's (scripts/gpu_session7.sh,
# profiles/h200/session7/) with what that one taught: the tune also times GEMV v4 in row groups
# at M = 5-16; the sweep's energy precision is PRECISION (default 2 %: session 7's 0.5 % took
# ~1 s windows and ~28 min for the 1309-point plan, more than a session holds); a step never
# asks for more than the call's 600 s; each step sends the run folder back as it stands.
# One step per call, back to back, in this order; the vLLM bundle (../shared/device/
# stage-gpu-deps --vllm, re-split into 55 MB parts) travels one part per call with the first
# three. Then commit runs/h200/{kernels.jsonl,run.json} (and runs/nf4/h200.json as
# dqprof/kernels/configs/h200.json if it is faster) unedited, with these commands beside them.
#   nf4   (carry part_00): triton-nf4's GPU tests (every decode against the fp32 reference);
#         `dqprof tune triton-nf4` over M 1-16 searching the decodes whose tests passed (about
#         1300 candidates, ~6 min), into
#         runs/nf4/h200.json (written after every shape, largest first: a cut tune keeps its
#         shapes)
#   torch (carry part_01): the energy window's GPU test; scripts/gpu_energy_check.py on bf16 and
#         triton-nf4 (every window twice back to back: the repeat spread); the sweep of the
#         paths that need only torch (bf16, tinygemm-int4, triton-nf4) into runs/h200
#   all   (carry part_02 + unpack.sh): the sweep of the other paths, resumed, gemlite-int4 last
#         (its first run on a board autotunes every M bucket)
#   sweep: the same, until nothing is left
# runs/ is git-ignored, so the tuned table and the run folder stay on the warm machine between
# calls; each step sends them back under $OUT. STEP_S bounds a step (default 540 s, at most 570).
#   [PRECISION=2%] bash scripts/gpu_session8.sh nf4|torch|all|sweep
set -uo pipefail
export PYTHONPATH=${GPU_SITE:-/tmp/gpu-site}:$PWD PYTHONUNBUFFERED=1
# the sweep's triton-nf4 reads this step's tune where it was written, else the bundled table
[[ -f runs/nf4/h200.json ]] && export DQPROF_NF4_CONFIG=$PWD/runs/nf4/h200.json
export DQPROF_CACHE_DIR=$PWD/runs/cache  # gemlite's autotune table, sent back by pack
RUN=runs/h200
T0=$(date +%s)
STEP_S=${STEP_S:-540}
(( STEP_S > 570 )) && STEP_S=570  # the call's limit is 600 s: leave room to pack up
PRECISION=${PRECISION:-2%}
OTHERS="bnb-nf4,bnb-dequant,marlin-gptq,marlin-awq,machete-gptq,machete-awq,fp8,fp8-channel"
mkdir -p "$RUN" runs/nf4
nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,temperature.gpu --format=csv,noheader
git log --oneline -1 2>/dev/null || true

left() { echo $(( STEP_S - ($(date +%s) - T0) )); }

sweep() {  # $1: backends; resumes the run folder and stops itself before the step's limit
  local t0; t0=$(date +%s)
  local budget; budget=$(left)
  (( budget > 20 )) || { echo "no time left for $1"; return; }
  timeout "$budget" python3 -m dqprof bench --backends "$1" -o "$RUN" --resume \
    --energy-precision "$PRECISION" >> "$OUT/sweep.log" 2>&1
  echo "sweep [$1] rc=$? $(( $(date +%s) - t0 )) s"; tail -2 "$OUT/sweep.log"
}

summary() {
  python3 - "$RUN/kernels.jsonl" <<'PY'
import collections, json, statistics, sys
try:
    recs = [json.loads(line) for line in open(sys.argv[1])]
except OSError:
    sys.exit("no records yet")
ok = [r for r in recs if r["status"] == "ok"]
print(len(recs), "records;", dict(collections.Counter((r["backend"], r["status"]) for r in recs)))
for phase in ("prepare", "check", "capture", "attribution", "timing", "energy"):
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
}

pack() {
  cp runs/nf4/h200.json "$OUT/nf4-h200.json" 2>/dev/null
  # gemlite's autotune table: commit it as dqprof/kernels/configs/gemlite/nvidia_h200.json
  cp "$DQPROF_CACHE_DIR"/gemlite/*.json "$OUT/" 2>/dev/null
  [[ -f $RUN/kernels.jsonl ]] && tar -C runs -czf "$OUT/h200-run.tar.gz" h200
}

case "${1:-}" in
nf4)
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  timeout 150 python3 -m pytest -q -m gpu tests/test_triton_nf4.py -p no:cacheprovider \
    --junitxml="$OUT/nf4-tests.xml" > "$OUT/nf4-tests.txt" 2>&1
  echo "nf4 gpu tests rc=$? $(( $(date +%s) - T0 )) s"; tail -n 6 "$OUT/nf4-tests.txt"
  # shellcheck disable=SC2046  # the specs split on commas below
  DECODES=$(python3 scripts/nf4_ab.py passed "$OUT/nf4-tests.xml" triton-nf4 \
    "triton-nf4[decode=table4]" "triton-nf4[decode=shfl]" | python3 -c "
import sys; sys.path.insert(0, 'scripts'); from nf4_ab import decode_of
print(','.join(decode_of(s) for s in sys.stdin.read().strip().split(',') if s))")
  echo "decodes searched: ${DECODES:-none}"
  t0=$(date +%s)
  timeout $(( $(left) - 40 )) python3 -m dqprof tune triton-nf4 --m 1,2,4,8,16 \
    --decodes "${DECODES:-table}" -o runs/nf4/h200.json > "$OUT/tune.txt" 2> "$OUT/tune.err"
  echo "tune rc=$? $(( $(date +%s) - t0 )) s"; tail -n 3 "$OUT/tune.err"
  cp runs/nf4/h200.log.jsonl "$OUT/nf4-tune.log.jsonl" 2>/dev/null
  python3 - <<'PY'
import collections, json
try:
    t = json.load(open("runs/nf4/h200.json"))
except OSError:
    raise SystemExit("no tuned table")
print(len(t["entries"]), "entries; decodes", t.get("decodes"))
for e in t["entries"]:
    c = e["config"]
    print(f"{e['layer']:32s} M<={e['m_max']:3d} {c['kernel']} {c.get('decode', '')} "
          f"{c['block_m']}x{c['block_n']}x{c['block_k']} s{c['split_k']} {e['median_s']*1e6:.2f} us")
PY
  pack ;;
torch)
  timeout 60 python3 -m pytest -q -m gpu tests/test_gpu.py -k energy_window -p no:cacheprovider \
    > "$OUT/gpu-energy-test.txt" 2>&1; echo "energy window test rc=$?"
  tail -n 3 "$OUT/gpu-energy-test.txt"
  DQPROF_CHECK_BACKENDS=bf16,triton-nf4 DQPROF_CHECK_PRECISION=$PRECISION timeout 150 \
    python3 scripts/gpu_energy_check.py \
    > "$OUT/energy-check.log" 2>&1; echo "energy check rc=$?"; tail -n 12 "$OUT/energy-check.log"
  tar -czf "$OUT/energy-check.tar.gz" -C "$OUT" energy-check && rm -rf "$OUT/energy-check"
  sweep "bf16,tinygemm-int4,triton-nf4,triton-nf4[stats=fp32]"; summary; pack ;;
all|sweep)
  [[ $1 == all ]] && python3 -c "import vllm, bitsandbytes, gemlite
print('vllm', vllm.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
  sweep "$OTHERS"; sweep gemlite-int4; summary; pack ;;
*)
  echo "usage: bash scripts/gpu_session8.sh nf4|torch|all|sweep" >&2; exit 2 ;;
esac
ls -la "$OUT"
