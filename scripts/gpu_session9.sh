#!/usr/bin/env bash
# The next session's GPU batch (30 min of device time): the full model in vLLM with dqprof_nf4
# and fp8 next to bf16 and bitsandbytes on one board, each point with its in-situ step
# profile (issues 11, 12), plus what tells why triton-nf4's tensor-core kernel is slow (ncu).
# What session 8 taught (scripts/gpu_session8.sh, profiles/h200/session8/):
# - the machine started in ~1.5 min; five calls back to back held it 29 min for 27 min of
#   commands. A vLLM quantization costs ~5 min (engine start ~2.5 min + 8 points), so one
#   session holds four quantizations and little else: gptq_marlin, gemlite-int4, the gate
#   across boards (scripts/gpu_gate_boards.sh) and the 2-layer vLLM GPU tests
#   (scripts/gpu_fullmodel.sh test) are the session after's.
# - the bundle is 4 parts of 45 MB (the tree is ~14 MB; a call carries 64 MiB):
#     cat .gpu-deps/part_* > /tmp/b && rm .gpu-deps/part_* && split -b 45M -d /tmp/b .gpu-deps/part_
# Steps, one per call, back to back (a warm machine is given back after 30 s idle); the first
# three carry one part of the bundle each and do the work that needs only torch and triton:
#   a      (carry part_00): the full-size bf16 and gptq checkpoints (synth, ~40 s) and the MMA's
#          decode=direct GPU tests
#   ab     (carry part_01): the MMA decodes side by side with bf16 in one run (gate_up, down at
#          M = 16, 256, 4096: 36 points, ~1.5 min)
#   ncu    (carry part_02): ncu on the MMA (gate_up at M = 4096: table, shfl, direct; at 16:
#          table, direct); stops at the first run that reads no counters
#   No retune: dqprof_nf4 runs the bundled table, the one profiles/h200/kernels.jsonl was swept
#   with, so the in-situ and kernel figures match.
#   model  (carry part_03 + unpack.sh first time): the matrix, one quantization at a time in
#          QUANTS order, resumed; a quantization starts only with MIN_Q_S left in the call, so
#          a call holds one (~6 min with the in-situ profile) and ends: call `model` again at
#          once (held time is what counts, not the call's limit) until it says nothing is left
#          or the device time is gone (then STEP_S = what status says is left, minus 30 s,
#          and MIN_Q_S lower: a quantization cut by the budget keeps the points it measured)
#   [STEP_S=570] [MIN_Q_S=330] [QUANTS=dqprof_nf4,bf16,bitsandbytes,fp8,gptq_marlin] bash scripts/gpu_session9.sh a|ab|ncu|model
# Then: the model run goes to profiles/h200/session9/ (commands beside it), the report and
# README's full-model table are regenerated; the ncu CSVs go to docs/triton-nf4.md's analysis.
# At most 8 files come back a call: a gives synth.log, nf4-direct-tests.txt; ab mma-ab.log,
# mma-ab.tar.gz; ncu ncu.tar.gz; model gives model-<quant>.log (one or two), model-run.tar.gz,
# traces-bf16.tar.gz (bf16's in-situ Chrome traces, once bf16 has run)
# and, the first time, nf4-bnb-tests.txt (the bitsandbytes-equivalence GPU tests, never run yet).
set -uo pipefail
export PYTHONPATH=${GPU_SITE:-/tmp/gpu-site}:$PWD PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
T0=$(date +%s)
STEP_S=${STEP_S:-570}
(( STEP_S > 575 )) && STEP_S=575  # the call's limit is 600 s: leave room to pack up
QUANTS=${QUANTS:-dqprof_nf4,bf16,bitsandbytes,fp8,gptq_marlin}
MIN_Q_S=${MIN_Q_S:-330}  # an engine start plus 8 points, measured ~295-310 s in session 2
# the MMA decodes side by side in one run (bf16 beside them: the ratio's other half)
MMA_AB="bf16,triton-nf4,triton-nf4[decode=shfl],triton-nf4[decode=direct],triton-nf4[stats=fp32],triton-nf4[decode=direct,stats=fp32]"
CKPTS=/tmp/dqprof-ckpt
RUN=runs/model
mkdir -p /opt/gpu-stage "$RUN"
cp .gpu-deps/part_* /opt/gpu-stage/ 2>/dev/null  # the bundle's parts, one per call
nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,temperature.gpu --format=csv,noheader
git log --oneline -1 2>/dev/null || true
left() { echo $(( STEP_S - ($(date +%s) - T0) )); }

pack() {  # the run folder holds the vLLM worker logs too (logs/); the kept traces apart
  [[ -f $RUN/model.jsonl ]] && tar -C runs -czf "$OUT/model-run.tar.gz" --exclude=traces model
  [[ -d $RUN/logs/traces ]] && tar -C "$RUN/logs" -czf "$OUT/traces-${KEEP_TRACES_FOR:-bf16}.tar.gz" traces
}

case "${1:-}" in
a)
  bash scripts/gpu_ckpts.sh bf16 gptq
  # the MMA's decode=direct (new, static counts only so far): its GPU tests
  timeout 100 python3 -m pytest -q -m gpu tests/test_triton_nf4.py -k direct -p no:cacheprovider \
    > "$OUT/nf4-direct-tests.txt" 2>&1
  echo "direct gpu tests rc=$?"; tail -n 2 "$OUT/nf4-direct-tests.txt" ;;
ab)
  timeout 150 python3 -m dqprof bench --backends "$MMA_AB" --m 16,256,4096 \
    --shapes mlp.gate_up_proj,mlp.down_proj --energy-precision 2% \
    -o runs/mma-ab > "$OUT/mma-ab.log" 2>&1
  echo "mma a/b rc=$?"; tail -n 1 "$OUT/mma-ab.log"
  tar -C runs -czf "$OUT/mma-ab.tar.gz" mma-ab ;;
ncu)
  mkdir -p "$OUT/ncu"
  ok=1
  for spec in "mlp.gate_up_proj 4096 table" "mlp.gate_up_proj 4096 shfl" \
      "mlp.gate_up_proj 4096 direct" "mlp.gate_up_proj 16 table" "mlp.gate_up_proj 16 direct"; do
    (( ok )) || break
    read -r layer m decode <<< "$spec"
    f="$OUT/ncu/$layer-m$m-$decode.csv"
    timeout 60 ncu --clock-control none -k regex:_nf4_mma --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy --csv \
      python3 scripts/nf4_kernel_once.py "$layer" "$m" --decode "$decode" > "$f" 2> "$f.err"
    rc=$?; echo "ncu $spec rc=$rc ($(grep -c _nf4_mma "$f") metric rows)"
    grep -q _nf4_mma "$f" || { ok=0; tail -n 3 "$f" "$f.err"; }  # no counters here: stop
  done
  tar -C "$OUT" -czf "$OUT/ncu.tar.gz" ncu && rm -rf "$OUT/ncu" ;;
model)
  python3 -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
  if [[ ! -f runs/bnb-tests.done ]]; then  # once, now that bitsandbytes is there (~40 s)
    timeout 120 python3 -m pytest -q -m gpu tests/test_triton_nf4.py -k bitsandbytes \
      -p no:cacheprovider > "$OUT/nf4-bnb-tests.txt" 2>&1
    echo "bitsandbytes-equivalence gpu tests rc=$?"; tail -n 2 "$OUT/nf4-bnb-tests.txt"
    touch runs/bnb-tests.done
  fi
  for q in ${QUANTS//,/ }; do
    done_pts=$(python3 - "$RUN" "$q" <<'PY'
import sys
from dqprof.fullmodel.records import latest, load_model_records
try:
    print(sum(1 for r in latest(load_model_records(sys.argv[1]))
              if r["quant"] == sys.argv[2] and r["status"] == "ok"))
except Exception:
    print(0)
PY
)
    (( done_pts >= 8 )) && { echo "$q: 8 of 8 points already"; continue; }
    budget=$(( $(left) - 15 ))
    (( budget >= MIN_Q_S )) || { echo "$q: ${budget} s left in this call, not started"; break; }
    t0=$(date +%s)
    ckpt=$CKPTS/g4-bf16; [[ $q == gptq_marlin ]] && ckpt=$CKPTS/g4-gptq
    keep=(); [[ $q == "${KEEP_TRACES_FOR:-bf16}" ]] && keep=(--keep-traces)  # for the CPU tests
    python3 -m dqprof model run --quant "$q@$ckpt" --batch 1,8,32,128 --workload decode,prefill \
      --budget "$budget" --timeout "$budget" "${keep[@]}" -o "$RUN" > "$OUT/model-$q.log" 2>&1
    echo "$q rc=$? $(( $(date +%s) - t0 )) s"; tail -n 12 "$OUT/model-$q.log"
  done
  pack ;;
*)
  echo "usage: bash scripts/gpu_session9.sh a|ab|ncu|model" >&2; exit 2 ;;
esac
ls -la "$OUT"
