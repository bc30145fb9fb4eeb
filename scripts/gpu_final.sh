#!/usr/bin/env bash
# This session's last GPU batch, in three back-to-back calls that also carry vLLM's bundle:
#   A: (part_00)  triton-nf4 vs bf16 and tinygemm with energy (new feeder + precision window)
#   B: (part_01)  nothing else
#   C: (part_02 + unpack)  energy check incl. Machete, GPU tests of the new paths, and
#      bnb-nf4 / marlin / machete / fp8 / gemlite vs triton-nf4 and bf16 with energy
#   D: (no bundle)  after the counter-read deadline fix and GEMV v3: idle share of the energy
#      window and triton-nf4 at M <= 4 (tuned table and heuristic), then triton-nf4's GPU tests
# Results: $OUT/<step>.tar.gz and logs.  bash scripts/gpu_final.sh A|C|D
set -uo pipefail
export PYTHONPATH=${GPU_SITE:-/tmp/gpu-site}:$PWD PYTHONUNBUFFERED=1
R=/tmp/final; mkdir -p $R
SL="mlp.gate_up_proj,mlp.down_proj,sliding.qkv_proj"
case "$1" in
A)
  nvidia-smi --query-gpu=name,uuid,driver_version,power.limit,temperature.gpu --format=csv
  timeout 300 python3 -m dqprof bench --backends "bf16,tinygemm-int4,triton-nf4,triton-nf4[stats=fp16]" \
    --shapes "$SL" --m 1,4,16,256,4096 -o $R/a > $R/a.log 2>&1; echo "A bench rc=$?"
  tail -3 $R/a.log; tar -C $R -czf "$OUT/a.tar.gz" a a.log ;;
C)
  nvidia-smi --query-gpu=name,uuid,power.limit --format=csv
  python3 -c "import vllm, bitsandbytes, gemlite; print('vllm', vllm.__version__, 'bnb', bitsandbytes.__version__)" 2>&1 | tail -1
  OUT=$R/c timeout 200 python3 scripts/gpu_energy_check.py > $R/energy-check.log 2>&1; echo "energy check rc=$?"
  tail -25 $R/energy-check.log
  timeout 100 python3 -m dqprof bench --backends "bf16,bnb-nf4,triton-nf4,marlin-gptq,machete-gptq,fp8,fp8-channel" \
    --shapes mlp.gate_up_proj,mlp.down_proj --m 1,16,256,4096 -o $R/paths > $R/paths.log 2>&1; echo "paths rc=$?"
  tail -2 $R/paths.log
  timeout 120 python3 -m dqprof bench --backends "gemlite-int4" --point-timeout 110 \
    --shapes mlp.gate_up_proj,mlp.down_proj --m 1,16,256,4096 -o $R/paths --resume > $R/gemlite.log 2>&1; echo "gemlite rc=$?"
  tail -2 $R/gemlite.log
  timeout 90 python3 -m pytest -q -m gpu tests/test_gpu_paths.py -x -k "not gemlite" > $R/paths-tests.log 2>&1; echo "path tests rc=$?"
  tail -4 $R/paths-tests.log
  tar -C $R -czf "$OUT/c.tar.gz" c paths energy-check.log paths.log gemlite.log paths-tests.log ;;
D)
  nvidia-smi --query-gpu=name,uuid,power.limit,temperature.gpu --format=csv
  timeout 130 python3 -m dqprof bench --backends "bf16,tinygemm-int4,triton-nf4,triton-nf4[tuned=false]" \
    --shapes "$SL" --m 1,2,4 -o $R/d > $R/d.log 2>&1; echo "D bench rc=$?"
  tail -2 $R/d.log
  timeout 100 python3 -m pytest -q -m gpu tests/test_triton_nf4.py > $R/d-tests.log 2>&1; echo "tests rc=$?"
  tail -3 $R/d-tests.log
  tar -C $R -czf "$OUT/d.tar.gz" d d.log d-tests.log ;;
esac
ls -la "$OUT"
