#!/usr/bin/env bash
# A session's GPU work on a 2-GPU machine, resumable across calls: the kernel profile (issue 2)
# on GPU 0 and the full-model vLLM matrix (issue 4) on GPU 1, side by side. Each GPU has its
# own NVML counter and power limit, so neither stream's energy sees the other's work.
#
#   DQPROF_GIT_COMMIT=<sha> bash scripts/gpu_pair.sh BUDGET_S      (on the GPU machine)
#   SEED_RUN=profiles/h200 ...   the sweep extends that profile (only paths it lacks run)
#   SEED_MODEL_RUN=profiles/h200 the matrix extends that profile's model.jsonl (with its
#                                model-run/run.json): only the points it lacks run
#   BACKENDS=...                 the sweep's paths (default: all of them)
#   BENCH_ARGS="--no-energy"     more arguments for the sweep's `dqprof bench`
#   MODEL_BATCHES=1,8,32,128 MODEL_WORKLOADS=decode,prefill   the matrix (these defaults)
#   SKIP_STEPS="k-gate k-ab"     steps to leave out (k-tests k-sweep k-gate k-ab m-tests)
#   TESTS_K=machete              only the GPU tests matching this pytest -k expression
#
# On a 1-GPU machine the streams run one after the other on GPU 0, the model stream first and
# the kernel stream in what a call has left, so no energy window sees the other stream's work.
#
# Every call continues where the last one stopped (state in /tmp survives while the machine
# is held): steps finished are marked done; a cut sweep or matrix resumes; a step that would
# not fit in the time left waits for the next call. Results: $OUT/results.tar.gz (kernels/,
# model/ and a log per stream) and the streams' log tails on stdout.
#   kernel stream (GPU 0): env + GPU tests -> full default sweep (all paths) -> ci-smoke twice
#                          + the gate demo -> Triton NF4 tile A/B
#   model stream (GPU 1):  2-layer GPU tests -> bf16, bitsandbytes, gptq_marlin, awq_marlin
#                          matrices (one quantization at a time, each given all the time left)
set -uo pipefail
budget=${1:?usage: scripts/gpu_pair.sh BUDGET_S}
start=$(date +%s); deadline=$(( start + budget - 25 ))  # 25 s to pack results
export PYTHONPATH=${GPU_SITE:-/tmp/gpu-site}:$PWD PYTHONUNBUFFERED=1
export TORCHINDUCTOR_COMPILE_THREADS=8  # vLLM's compile must not starve the sweep's host loop
S=/tmp/dqprof-state; R=/tmp/dqprof-results; mkdir -p "$S" "$R/kernels" "$R/model"
left() { echo $(( deadline - $(date +%s) )); }
log() { echo "[$(date +%T)] $*"; }
for step in ${SKIP_STEPS:-}; do touch "$S/$step"; done  # marked done: never run
BACKENDS=${BACKENDS:-bf16,bnb-nf4,bnb-dequant,marlin-gptq,marlin-awq,machete-gptq,machete-awq,tinygemm-int4,triton-nf4}

NGPU=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
KGPU=0; MGPU=$(( NGPU > 1 ? 1 : 0 ))

kernel_stream() {
  export CUDA_VISIBLE_DEVICES=$KGPU OUT=$R/kernels
  if [[ ! -f $S/k-tests ]]; then
    log "kernel GPU tests"; RUN_GPU_TESTS=1 bash scripts/gpu_session.sh && touch "$S/k-tests"
  fi
  if [[ ! -f $S/k-sweep ]]; then
    (( $(left) > 60 )) || return
    if [[ -n "${SEED_RUN:-}" && ! -f /tmp/runs/h200/kernels.jsonl ]]; then
      # extend a committed profile: --resume measures only the points it lacks (new paths)
      mkdir -p /tmp/runs/h200 && cp "$SEED_RUN"/kernels.jsonl "$SEED_RUN"/run.json /tmp/runs/h200/
    fi
    log "full sweep, $(left) s left"
    RUN_DIR=/tmp/runs/h200 SKIP_ENV=1 bash scripts/gpu_session.sh "$(left)" \
      --backends "$BACKENDS" --resume ${BENCH_ARGS:-} && touch "$S/k-sweep"
  fi
  [[ -f $S/k-sweep ]] || return
  if [[ ! -f $S/k-gate ]] && (( $(left) > 300 )); then  # ~250 s: a cut demo is redone whole
    log "gate demo"; rm -rf /tmp/gate
    timeout --signal=KILL "$(left)" bash scripts/gpu_gate_demo.sh && touch "$S/k-gate"
  fi
  if [[ ! -f $S/k-ab ]]; then
    (( $(left) > 90 )) || return
    log "triton-nf4 tile A/B"; rm -rf /tmp/runs/triton-ab
    OUT=$R/kernels/ab RUN_DIR=/tmp/runs/triton-ab SKIP_ENV=1 bash scripts/gpu_session.sh \
      "$(left)" --backends "triton-nf4[split_k=8],triton-nf4[block_n=64],triton-nf4[block_k=64]" \
      --shapes mlp.gate_up_proj,mlp.down_proj,sliding.qkv_proj --m 1,4,8,16 --window 0.5 \
      && touch "$S/k-ab"
  fi
}

MODEL_BATCHES=${MODEL_BATCHES:-1,8,32,128}; MODEL_WORKLOADS=${MODEL_WORKLOADS:-decode,prefill}

quant_done() {  # every point of this quantization has an ok record
  python3 - "$1" "$(( $(tr ',' '\n' <<< "$MODEL_BATCHES" | wc -l) * $(tr ',' '\n' <<< "$MODEL_WORKLOADS" | wc -l) ))" <<'PY'
import sys
from pathlib import Path
from dqprof.fullmodel.records import latest, load_model_records
run = Path("/tmp/dqprof-model-run")
recs = latest(load_model_records(run)) if (run / "model.jsonl").exists() else []
mine = [r for r in recs if r["quant"] == sys.argv[1]]
sys.exit(0 if len(mine) >= int(sys.argv[2]) and all(r["status"] == "ok" for r in mine) else 1)
PY
}

model_stream() {
  export CUDA_VISIBLE_DEVICES=$MGPU OUT=$R/model
  if [[ -n "${SEED_MODEL_RUN:-}" && ! -f /tmp/dqprof-model-run/model.jsonl ]]; then
    mkdir -p /tmp/dqprof-model-run  # `dqprof model run` resumes it: ok points are kept
    cp "$SEED_MODEL_RUN"/model.jsonl "$SEED_MODEL_RUN"/model-run/run.json /tmp/dqprof-model-run/
  fi
  if [[ ! -f $S/m-tests ]]; then
    (( $(left) > 200 )) || return
    log "full-model GPU tests"
    bash scripts/gpu_fullmodel.sh test "$(left)" && touch "$S/m-tests"
  fi
  for q in bf16 bitsandbytes gptq_marlin awq_marlin; do
    quant_done $q && continue
    # an engine start alone takes ~2 min and a whole matrix ~5: a start cut short is wasted
    (( $(left) > ${MIN_QUANT_S:-240} )) || return
    log "model matrix $q, $(left) s left"
    bash scripts/gpu_fullmodel.sh "$(left)" $q "$MODEL_BATCHES" "$MODEL_WORKLOADS"
  done
}

nvidia-smi --query-gpu=index,name,driver_version,power.limit,temperature.gpu,memory.used \
  --format=csv
if (( NGPU > 1 )); then
  kernel_stream >> "$R/kernel-stream.log" 2>&1 &
  kpid=$!
  model_stream >> "$R/model-stream.log" 2>&1 &
  mpid=$!
  wait $kpid $mpid
else
  # the kernel stream is resumable point by point: it fills what the matrix leaves of a call
  ( MIN_QUANT_S=300 model_stream ) >> "$R/model-stream.log" 2>&1
  ( kernel_stream ) >> "$R/kernel-stream.log" 2>&1
fi
log "streams done after $(( $(date +%s) - start )) s; state: $(ls "$S" | tr '\n' ' ')"
for f in kernel-stream model-stream; do
  echo "=== $f"; grep -v -E '^\s*$|Warning|warn\(' "$R/$f.log" | tail -n 30 | cut -c1-190
done
tar -C "$R" -czf "$OUT/results.tar.gz" . && ls -la "$OUT"
