#!/usr/bin/env bash
# Full-model vLLM runs on the GPU machine (issue 4): synthesize Gemma 4 E4B checkpoints into
# /tmp, run the quantization matrix inside a total time budget, copy the results to $OUT.
#
#   scripts/gpu_fullmodel.sh test [TIMEOUT_S] [PYTEST_K]
#       the 2-layer GPU tests (tests/test_fullmodel_gpu.py): 6 quantizations eager, bf16 and
#       dqprof_nf4 compiled with the in-situ profile, bitsandbytes vs dqprof_nf4 logits;
#       PYTEST_K (pytest -k) selects a part of them (all of them take over one 10-min call)
#   scripts/gpu_fullmodel.sh BUDGET_S [QUANTS] [BATCHES] [WORKLOADS] [ENGINE]
#       BUDGET_S covers synthesis and the matrix (keep it ~30 s under the call's limit);
#       QUANTS bf16,bitsandbytes,gptq_marlin,awq_marlin (also dqprof_nf4, fp8: on the bf16
#       checkpoint); BATCHES 1,8,32,128;
#       WORKLOADS decode,prefill; ENGINE default|graphs|eager (default: default).
#
# Needs vLLM staged (../shared/device/stage-gpu-deps --vllm; /tmp/gpu-site). Checkpoints live
# in $CKPT (default /tmp/dqprof-ckpt) and are reused by later calls on the same machine; a run
# folder ($RUN, default /tmp/dqprof-model-run) is resumed: points already ok are not redone.
# Back under $OUT: model.jsonl, run.json, one log per quantization, this script's log.
# SYNTH_ARGS (e.g. "--layers 2 --vocab 4096 --device cpu") replaces the full-size GPU synthesis
# for a dry run of this script elsewhere.
set -uo pipefail
export PYTHONPATH=${GPU_SITE:-/tmp/gpu-site}:$PWD PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
OUT=${OUT:-/tmp/dqprof-out}; CKPT=${CKPT:-/tmp/dqprof-ckpt}; RUN=${RUN:-/tmp/dqprof-model-run}
mkdir -p "$OUT" "$CKPT"
exec > >(tee -a "$OUT/gpu_fullmodel.log") 2>&1
log() { echo "[$(date +%T)] $*"; }
start=$(date +%s)

if [[ "${1:-}" == "test" ]]; then
  log "fullmodel GPU tests"
  timeout --signal=KILL "${2:-570}" python3 -m pytest -m gpu -q -s --no-header -p no:cacheprovider \
    ${3:+-k "$3"} tests/test_fullmodel_gpu.py 2>&1 | tail -60
  log "done after $(( $(date +%s) - start )) s"
  exit 0
fi

budget=${1:?usage: scripts/gpu_fullmodel.sh BUDGET_S [QUANTS] [BATCHES] [WORKLOADS] [ENGINE]}
quants=${2:-bf16,bitsandbytes,gptq_marlin,awq_marlin}
batches=${3:-1,8,32,128}
workloads=${4:-decode,prefill}
engine=${5:-default}
deadline=$(( start + budget ))
nvidia-smi --query-gpu=name,driver_version,power.limit,temperature.gpu,memory.used --format=csv
df -h /tmp | tail -1

declare -A FMT=([bf16]=bf16 [bitsandbytes]=bf16 [dqprof_nf4]=bf16 [fp8]=bf16 [gptq_marlin]=gptq
                [awq_marlin]=awq)
spec=""
for q in ${quants//,/ }; do
  fmt=${FMT[$q]:-}
  [[ -z "$fmt" ]] && { log "unknown quantization $q"; exit 2; }
  dir="$CKPT/g4-$fmt"
  if [[ ! -f "$dir/config.json" ]]; then  # config.json is written last: present = complete
    log "synth $fmt -> $dir"
    t=$(date +%s)
    # shellcheck disable=SC2086
    python3 -m dqprof model synth gemma-4-e4b --format "$fmt" -o "$dir" --force \
      ${SYNTH_ARGS:---device cuda} \
      || { log "synth $fmt failed"; exit 1; }
    log "synth $fmt took $(( $(date +%s) - t )) s"; df -h /tmp | tail -1
  fi
  spec+="${spec:+,}$q@$dir"
done

left=$(( deadline - $(date +%s) - 15 ))  # keep 15 s to copy results
log "run $spec, batches $batches, workloads $workloads, engine $engine, budget ${left} s"
python3 -m dqprof model run --quant "$spec" --batch "$batches" --workload "$workloads" \
  --engine "$engine" --budget "$left" --timeout "$left" -o "$RUN"
log "run exit $? after $(( $(date +%s) - start )) s"

cp "$RUN/model.jsonl" "$RUN/run.json" "$OUT/" 2>/dev/null
for f in "$RUN"/logs/*.log; do  # vLLM logs: the tail is what explains a failure
  [[ -f "$f" ]] && tail -c 4000000 "$f" > "$OUT/$(basename "$f")"
done
[[ -f "$RUN/model.jsonl" ]] && python3 - "$RUN" <<'PY'
import sys
from dqprof.fullmodel.records import latest, load_model_records
for r in latest(load_model_records(sys.argv[1])):
    d = r.get("decode") or {}
    p = r.get("prefill") or {}
    print(f"{r['quant']:13s} {r['workload']:8s} b={r['batch']:<4d} {r['status']:7s}",
          f"tok/s={r.get('tokens_per_s') or 0:9.1f} decode J/tok={d.get('j_per_token')}",
          f"prefill J/tok={p.get('j_per_token')} attn={(r.get('engine') or {}).get('attention_backend')}",
          f"linear={(r.get('engine') or {}).get('linear_kernel')}",
          f"start={(r.get('engine_start') or {}).get('s')}s/{(r.get('engine_start') or {}).get('j')}J",
          (r.get("reason") or "")[:160])
    s = (r.get("in_situ") or {}).get("decode") or {}
    if s:
        lin = sum((s.get("linear_by_group") or {}).values())
        print(f"    in situ decode: {s.get('status')} steps={s.get('steps')} "
              f"span={1e3 * (s.get('span_s') or 0):.3f} ms linear={1e3 * lin:.3f} ms "
              f"idle={1e3 * (s.get('idle_s') or 0):.3f} ms named+idle={s.get('named_fraction')} "
              f"{s.get('reason') or ''}")
PY
