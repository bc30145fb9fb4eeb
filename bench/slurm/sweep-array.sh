#!/usr/bin/env bash
# The full sweep as a SLURM job array: one task per shard of one plan, one GPU each, then one
# dependent job that joins the shards with `dqprof merge` (and, with BASELINE set, gates it).
#   bash bench/slurm/sweep-array.sh                 # submits both jobs (SHARDS=4 by default)
#   SHARDS=8 OUT=runs/full bash bench/slurm/sweep-array.sh
# Tasks of one array may land on different boards (or nodes) of one GPU model: each record
# names its board, and `dqprof regress` normalizes energy across boards; a shard takes whole
# shapes (bf16 beside each shape's other backends), so SHARDS beyond the suite's shape count
# (10 in bench/full.toml) leaves tasks with nothing to measure. A node with several
# GPUs can run `dqprof bench --gpus all` in one job instead.
set -euo pipefail
SHARDS=${SHARDS:-4}
SUITE=${SUITE:-bench/full.toml}
OUT=${OUT:-runs/sweep-$(date +%Y%m%d-%H%M%S)}
BASELINE=${BASELINE:-}

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ] && [ "${1:-}" != "--merge" ]; then
  mkdir -p "$OUT/logs"
  array=$(sbatch --parsable --job-name=dqprof-sweep --array=1-"$SHARDS" --gres=gpu:1 \
    --time=01:00:00 --output="$OUT/logs/shard-%a.log" \
    --export=ALL,SHARDS="$SHARDS",SUITE="$SUITE",OUT="$OUT" "$0")
  sbatch --job-name=dqprof-merge --dependency=afterany:"$array" --time=00:10:00 \
    --output="$OUT/logs/merge.log" --export=ALL,OUT="$OUT",BASELINE="$BASELINE" "$0" --merge
  echo "submitted array $array ($SHARDS shards) and its merge into $OUT/merged"
  exit 0
fi

if [ "${1:-}" = "--merge" ]; then
  dqprof merge "$OUT"/shard-* -o "$OUT/merged"
  if [ -n "$BASELINE" ]; then
    dqprof regress --baseline "$BASELINE" --current "$OUT/merged" --junit "$OUT/junit.xml" --summary "$OUT/summary.md"
  fi
  exit 0
fi

# one array task: SLURM sets CUDA_VISIBLE_DEVICES to the GPU it granted
dqprof bench --suite "$SUITE" --shard "$SLURM_ARRAY_TASK_ID/$SHARDS" -o "$OUT/shard-$SLURM_ARRAY_TASK_ID" --resume
