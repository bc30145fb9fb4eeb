#!/usr/bin/env bash
# Session 12's GPU batch (30 min of device time, one board): issue 11's sweep and full model
# with triton-nf4's dequantize path (the default beyond M = 16 since session 11).
#   a      (carry part_00 + bnb.tar.xz): the full-size bf16 checkpoint; then one sweep folder,
#          runs/sweep, resumed by every later step: triton-nf4 and bf16 at every shape and M;
#          triton-nf4[stats=fp32] (bnb-nf4's statistics) and bnb-nf4 at the M the report's
#          format/path split and the closing note read (M8 below)
#   b      (carry part_01): triton-nf4's GPU tests (the forced-MMA decode fixed since session
#          11, the dequantize path, CUDA graphs, bitsandbytes equivalence); gemlite-int4 at
#          M = 1, 16 on the five attention/MLP layers and 256, 4096 on gate_up and down (its
#          autotune costs ~9 s per layer and M: the cache it leaves is returned, to be bundled)
#   c      (carry part_02, then again with part_03): nothing but the carry
#   model  (carry part_04 + unpack.sh first): PLAN's quantizations in vLLM, both workloads,
#          in situ, resumed (default dqprof_nf4 at 1, 8, 32, 128); then marlin-gptq and
#          machete-gptq join runs/sweep at M8 in what the call has left
#   DQPROF_GIT_COMMIT=<hash> [STEP_S=570] [PLAN="bf16:1,8,32,128"] [LOGITS=1] \
#     bash scripts/gpu_session12.sh a|b|c|model
#   LOGITS=1: after the model step, the plugin's logits test against bitsandbytes in vLLM
# A call carries 64 MiB with the tree (23 MB now): the bundle (172 MB) goes as a 38 MB part
# with bitsandbytes + gemlite alone (bnb.tar.xz from a plain `stage-gpu-deps`, 3.7 MB, for
# the calls before vLLM is unpacked), then four of 33 MB:
#   cat .gpu-deps/part_* > /tmp/b && rm .gpu-deps/part_* && head -c 38000000 /tmp/b > .gpu-deps/part_00
#   tail -c +38000001 /tmp/b > /tmp/rest && split -n 4 -d -a 2 --numeric-suffixes=1 /tmp/rest .gpu-deps/part_
# Every call's files are copied into profiles/h200/session12/ at once (session 10's were lost).
set -uo pipefail
T0=$(date +%s)
STEP_S=${STEP_S:-570}
(( STEP_S > 575 )) && STEP_S=575  # the call's limit is 600 s: leave room to pack up
M8=1,8,16,64,256,512,2048,4096
ATTN_MLP=sliding.qkv_proj,sliding.o_proj,full.qkv_proj,full.o_proj,mlp.gate_up_proj,mlp.down_proj
export DQPROF_CACHE_DIR=/tmp/dqprof-cache PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
if [[ -d /tmp/gpu-site ]]; then SITE=/tmp/gpu-site; else SITE=/tmp/gpu-bnb/gpu-site; fi
export PYTHONPATH=$SITE:$PWD
mkdir -p /opt/gpu-stage runs
cp .gpu-deps/part_* /opt/gpu-stage/ 2>/dev/null  # the bundle's parts, one per call
nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,temperature.gpu --format=csv,noheader
echo "commit ${DQPROF_GIT_COMMIT:-(not given)}, site $SITE"
left() { echo $(( STEP_S - ($(date +%s) - T0) )); }
bench() {  # log name, then bench's arguments; all steps resume the one folder runs/sweep
  local name=$1; shift
  local s; s=$(( $(left) - 15 ))
  (( s >= 30 )) || { echo "$name: ${s} s left, not started"; return; }
  timeout "$s" python3 -m dqprof bench "$@" --energy-precision 2% --resume \
    -o runs/sweep > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(tail -n 1 "$OUT/$name.log")"
}
pack_sweep() { [[ -d runs/sweep ]] && tar -C runs -czf "$OUT/sweep.tar.gz" sweep; }

case "${1:-}" in
a)
  mkdir -p /tmp/gpu-bnb && xz -d < .gpu-deps/bnb.tar.xz | tar -C /tmp/gpu-bnb -xf -
  python3 -c "import bitsandbytes, gemlite; print('bitsandbytes', bitsandbytes.__version__)"
  bash scripts/gpu_ckpts.sh bf16
  bench sweep-a1 --backends triton-nf4,bf16
  bench sweep-a2 --backends "triton-nf4[stats=fp32],bnb-nf4" --m "$M8"
  pack_sweep ;;
b)
  timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE tests/test_triton_nf4.py \
    -k "gemma_shapes or dequant_path or cuda_graph or bitsandbytes" > "$OUT/nf4-gpu-tests.txt" 2>&1
  echo "triton-nf4 gpu tests rc=$?"; tail -n 2 "$OUT/nf4-gpu-tests.txt"
  bench sweep-b1 --backends gemlite-int4 --m 1,16 --shapes "$ATTN_MLP"
  bench sweep-b2 --backends gemlite-int4 --m 256,4096 --shapes mlp.gate_up_proj,mlp.down_proj
  cp "$DQPROF_CACHE_DIR"/gemlite/*.json "$OUT/" 2>/dev/null
  pack_sweep ;;
c) ;;
model)
  [[ -d /tmp/gpu-site ]] || { bash .gpu-deps/unpack.sh && export PYTHONPATH=/tmp/gpu-site:$PWD; }
  python3 -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
  RUN=runs/model
  for step in ${PLAN:-dqprof_nf4:1,8,32,128}; do
    q=${step%%:*}; batches=${step#*:}
    budget=$(( $(left) - 15 ))
    (( budget >= 180 )) || { echo "$q: ${budget} s left in this call, not started"; break; }
    t0=$(date +%s)
    python3 -m dqprof model run --quant "$q@/tmp/dqprof-ckpt/g4-bf16" --batch "$batches" \
      --workload decode,prefill --budget "$budget" --timeout "$budget" -o "$RUN" \
      > "$OUT/model-$q.log" 2>&1
    echo "$q rc=$? $(( $(date +%s) - t0 )) s"; tail -n 14 "$OUT/model-$q.log"
  done
  [[ -f $RUN/model.jsonl ]] && tar -C runs -czf "$OUT/model-run.tar.gz" --exclude=traces model
  if [[ ${LOGITS:-0} == 1 ]] && (( $(left) > 200 )); then
    timeout "$(( $(left) - 20 ))" python3 -m pytest -m gpu -q -p no:cacheprovider -rfE \
      tests/test_fullmodel_gpu.py -k logits > "$OUT/plugin-logits-test.txt" 2>&1
    echo "logits test rc=$?"; tail -n 2 "$OUT/plugin-logits-test.txt"
  fi
  bench sweep-m --backends marlin-gptq,machete-gptq --m "$M8"
  pack_sweep ;;
*)
  echo "usage: bash scripts/gpu_session12.sh a|b|c|model" >&2; exit 2 ;;
esac
ls -la "$OUT"
