#!/usr/bin/env bash
# The next session's GPU batch (30 min of device time): the full model with fp8 next to bf16 on
# one board, every point with its in-situ step profile now split by layer group, and the
# full-model GPU tests never run yet (issue 12; issue 11's plugin tests). The gate across boards
# (issue 13) and the gemlite-int4 sweep (issue 11) are the session after's (`gate` below).
# What session 9 taught (scripts/gpu_session9.sh, profiles/h200/session9/):
# - the machine started in ~1.5 min; six calls back to back held it 27.1 min for 24.9 min of
#   commands. A vLLM quantization with the in-situ profile costs 5-6 min (import 7 s, engine
#   start 120-135 s with cold compile caches, dqprof_nf4 249 s; 8 points ~170 s), so a call
#   holds one.
# - the machine's copy of .git lags the tree: pass the commit, DQPROF_GIT_COMMIT=<hash>.
# - the bundle is 4 parts of 45 MB (the tree is ~18 MB; a call carries 64 MiB):
#     cat .gpu-deps/part_* > /tmp/b && rm .gpu-deps/part_* && split -b 45M -d -a 2 /tmp/b .gpu-deps/part_
# Steps, one per call, back to back (a warm machine is given back after 30 s idle):
#   a      (carry part_00): the full-size bf16 and gptq checkpoints (synth, ~40 s)
#   ab     (carry part_01): the MMA at smaller tiles, which the compile check says fit where
#          session 9's did not (sm_90, triton 3.6, --asm): decode=direct at BN 64 takes 182-200
#          registers with no spill (255 and a 16-byte stack at the default 128x128x64, where
#          ncu saw 8 warps an SM and 1.7 M spill requests); the gather and shfl at BN 64 86-100
#          (two CTAs an SM). 24 points with bf16 beside them (~1 min)
#   carry  (carry part_02): nothing but the part
#   tests  (carry part_03 + unpack.sh): tests/test_fullmodel_gpu.py (the 2-layer Gemma 4 in vLLM
#          under six quantizations, eager; bf16 and dqprof_nf4 compiled with the in-situ
#          profile; bitsandbytes against dqprof_nf4 logits), as much as 560 s holds
#   model  the matrix, one quantization a call in QUANTS order (fp8, then bf16: the ratio's
#          other half), resumed (gpu_session9.sh's model step, fp8's traces kept); the last
#          call with STEP_S = what status says is left minus 30 s and a lower MIN_Q_S
#   gate   (the session after, once the bundle is unpacked): scripts/gpu_gate_boards.sh
#          (ci-smoke plain and through --gpus 0, the gate between them, the committed baseline
#          against this board, a slowed triton-nf4 against both; ~6 min)
#   DQPROF_GIT_COMMIT=<hash> [STEP_S=570] [MIN_Q_S=330] [QUANTS=fp8,bf16,gptq_marlin,bitsandbytes,dqprof_nf4] bash scripts/gpu_session10.sh a|ab|carry|tests|model|gate
# Then: profiles/h200/session10/ gets the files with these commands; model.jsonl becomes the new
# run only if it holds bf16 (ratios within one board), else the new run stays in session10/.
set -uo pipefail
export PYTHONPATH=${GPU_SITE:-/tmp/gpu-site}:$PWD PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
T0=$(date +%s)
STEP_S=${STEP_S:-570}
(( STEP_S > 575 )) && STEP_S=575  # the call's limit is 600 s: leave room to pack up
CKPTS=/tmp/dqprof-ckpt
SMALL_AB="bf16,triton-nf4,triton-nf4[block_n=64],triton-nf4[decode=shfl,block_n=64],triton-nf4[decode=direct,block_n=64],triton-nf4[decode=direct,stats=fp32,block_n=64]"
mkdir -p /opt/gpu-stage
cp .gpu-deps/part_* /opt/gpu-stage/ 2>/dev/null  # the bundle's parts, one per call
nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,temperature.gpu --format=csv,noheader
echo "commit ${DQPROF_GIT_COMMIT:-(not given)}"
left() { echo $(( STEP_S - ($(date +%s) - T0) )); }

case "${1:-}" in
a)
  bash scripts/gpu_ckpts.sh bf16 gptq ;;
ab)
  timeout 150 python3 -m dqprof bench --backends "$SMALL_AB" --m 256,4096 \
    --shapes mlp.gate_up_proj,mlp.down_proj --energy-precision 2% -o runs/mma-small \
    > "$OUT/mma-small.log" 2>&1
  echo "mma small-tile a/b rc=$?"; tail -n 1 "$OUT/mma-small.log"
  tar -C runs -czf "$OUT/mma-small.tar.gz" mma-small ;;
carry)
  ls -la /opt/gpu-stage ;;
tests)
  timeout 560 python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_fullmodel_gpu.py \
    > "$OUT/fullmodel-gpu-tests.txt" 2>&1
  echo "fullmodel gpu tests rc=$?"; tail -n 5 "$OUT/fullmodel-gpu-tests.txt"
  mkdir -p runs && touch runs/bnb-tests.done ;;  # session 9 ran them: the model step skips them
gate)
  python3 -c "import vllm, bitsandbytes; print('vllm', vllm.__version__, 'bnb', bitsandbytes.__version__)" 2>&1 | tail -1
  GATE=/tmp/gate-boards bash scripts/gpu_gate_boards.sh 2>&1 | tee "$OUT/gate-boards.log" | tail -n 30 ;;
model)
  mkdir -p runs && touch runs/bnb-tests.done  # session 9 ran them
  QUANTS=${QUANTS:-fp8,bf16,gptq_marlin,bitsandbytes,dqprof_nf4} KEEP_TRACES_FOR=fp8 \
    STEP_S=$(left) bash scripts/gpu_session9.sh model ;;
*)
  echo "usage: bash scripts/gpu_session10.sh a|ab|carry|tests|model|gate" >&2; exit 2 ;;
esac
ls -la "$OUT"
