#!/usr/bin/env bash
# On the GPU machine: the full-size random-weight Gemma 4 E4B checkpoints the model runs read,
# made once per machine (config.json is written last: present = complete); a log to $OUT.
#   bash scripts/gpu_ckpts.sh [FORMAT ...]     (default: bf16 gptq; also awq)
CKPTS=${CKPTS:-/tmp/dqprof-ckpt}
fmts=("$@"); (( ${#fmts[@]} )) || fmts=(bf16 gptq)
for fmt in "${fmts[@]}"; do
  t0=$(date +%s)
  [[ -f $CKPTS/g4-$fmt/config.json ]] || PYTHONPATH=$PWD python3 -m dqprof model synth \
    gemma-4-e4b --format "$fmt" -o "$CKPTS/g4-$fmt" --force --device cuda >> "${OUT:-/tmp}/synth.log" 2>&1
  echo "synth $fmt rc=$? $(( $(date +%s) - t0 )) s"
done
