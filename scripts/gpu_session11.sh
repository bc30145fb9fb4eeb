#!/usr/bin/env bash
# Session 11's GPU batch (30 min of device time). Session 10's results were lost with its
# checkout (they came back to a folder outside the repo, which the next checkout did not keep):
# copy what a call returns into the repo at once. This batch measures again what was lost and
# the new kernel=dequant path of triton-nf4 (issue 11: M >= 1024 at <= 1.5x bf16):
#   a      (carry part_00): the full-size bf16 checkpoint (synth, ~25 s); the dequant path
#          against the MMA and bf16 on gate_up and down, M = 16 ... 4096 (48 points)
#   b      (carry part_01): triton-nf4's GPU tests on the Gemma shapes, the dequant path and
#          CUDA graphs (~40 s; bitsandbytes' ones need the bundle), then the other quantized
#          layers with N, K >= 2048 at M = 1024 and 4096 (the target's set)
#   c      (carry part_02): the MMA at BLOCK_N 64 (session 10's lost small-tile A/B), if the
#          device budget holds it
#   model  (carry part_03 + unpack.sh first): the full model in vLLM with the in-situ step
#          profile (issue 12), PLAN's quantizations in order, each at its batches (decode and
#          prefill), resumed: fp8 at all four batches (its traces kept), then bf16 at 1 and 32,
#          the ratio's other half on this board (an engine start is ~130 s, a point ~21 s: one
#          call holds both, where two full ones took two calls)
#   gate   scripts/gpu_gate_boards.sh: ci-smoke, the committed baseline against this board, a
#          slowed triton-nf4, ci-smoke again through --gpus 0 (issue 13), as far as time goes
#   DQPROF_GIT_COMMIT=<hash> [STEP_S=570] [PLAN="fp8:1,8,32,128 bf16:1,32"] bash scripts/gpu_session11.sh a|b|c|model|gate
# The machine was refused seven times before this batch ran (481 s of device time), so the
# batch is cut to what the rest held.
# The bundle is 4 parts of 45 MB (the tree is ~18 MB; a call carries 64 MiB):
#   cat .gpu-deps/part_* > /tmp/b && rm .gpu-deps/part_* && split -b 45M -d -a 2 /tmp/b .gpu-deps/part_
# Then: profiles/h200/session11/ gets the files with these commands.
set -uo pipefail
export PYTHONPATH=${GPU_SITE:-/tmp/gpu-site}:$PWD PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
T0=$(date +%s)
STEP_S=${STEP_S:-570}
(( STEP_S > 575 )) && STEP_S=575  # the call's limit is 600 s: leave room to pack up
DQ_AB="bf16,triton-nf4,triton-nf4[kernel=mma],triton-nf4[kernel=dequant]"
BIG="sliding.qkv_proj,sliding.o_proj,full.qkv_proj,full.o_proj,ple.per_layer_model_projection"
SMALL_AB="triton-nf4[block_n=64],triton-nf4[decode=shfl,block_n=64],triton-nf4[decode=direct,block_n=64]"
mkdir -p /opt/gpu-stage runs
cp .gpu-deps/part_* /opt/gpu-stage/ 2>/dev/null  # the bundle's parts, one per call
nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,temperature.gpu --format=csv,noheader
echo "commit ${DQPROF_GIT_COMMIT:-(not given)}"
left() { echo $(( STEP_S - ($(date +%s) - T0) )); }
bench() {  # name, then bench's arguments: a run folder and its log, archived to $OUT
  local name=$1; shift
  timeout "$(( $(left) - 10 ))" python3 -m dqprof bench "$@" --energy-precision 2% \
    -o "runs/$name" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"; tail -n 1 "$OUT/$name.log"
  tar -C runs -czf "$OUT/$name.tar.gz" "$name"
}

case "${1:-}" in
a)
  bash scripts/gpu_ckpts.sh bf16
  bench dequant-ab --backends "$DQ_AB" --m 16,32,64,256,1024,4096 \
    --shapes mlp.gate_up_proj,mlp.down_proj ;;
b)
  timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE tests/test_triton_nf4.py \
    -k "gemma_shapes or dequant_path or cuda_graph" > "$OUT/nf4-gpu-tests.txt" 2>&1
  echo "triton-nf4 gpu tests rc=$?"; tail -n 2 "$OUT/nf4-gpu-tests.txt"
  bench dequant-big --backends "bf16,triton-nf4,triton-nf4[kernel=mma]" --m 1024,4096 \
    --shapes "$BIG" ;;
c)
  bench mma-small --backends "bf16,$SMALL_AB" --m 256,4096 \
    --shapes mlp.gate_up_proj,mlp.down_proj ;;
model)
  python3 -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
  RUN=runs/model
  for step in ${PLAN:-fp8:1,8,32,128 bf16:1,32}; do
    q=${step%%:*}; batches=${step#*:}
    budget=$(( $(left) - 15 ))
    (( budget >= 180 )) || { echo "$q: ${budget} s left in this call, not started"; break; }
    keep=(); [[ $q == fp8 ]] && keep=(--keep-traces)
    t0=$(date +%s)
    python3 -m dqprof model run --quant "$q@/tmp/dqprof-ckpt/g4-bf16" --batch "$batches" \
      --workload decode,prefill --budget "$budget" --timeout "$budget" "${keep[@]}" -o "$RUN" \
      > "$OUT/model-$q.log" 2>&1
    echo "$q rc=$? $(( $(date +%s) - t0 )) s"; tail -n 12 "$OUT/model-$q.log"
  done
  [[ -f $RUN/model.jsonl ]] && tar -C runs -czf "$OUT/model-run.tar.gz" --exclude=traces model
  [[ -d $RUN/logs/traces ]] && tar -C "$RUN/logs" -czf "$OUT/traces-fp8.tar.gz" traces ;;
gate)
  GATE=/tmp/gate-boards timeout "$(left)" bash scripts/gpu_gate_boards.sh 2>&1 \
    | tee "$OUT/gate-boards.log" | tail -n 30 ;;
*)
  echo "usage: bash scripts/gpu_session11.sh a|b|c|model|gate" >&2; exit 2 ;;
esac
ls -la "$OUT"
