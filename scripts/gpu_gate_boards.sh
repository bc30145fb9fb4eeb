#!/usr/bin/env bash
# The gate across boards and `bench --gpus` on the one-GPU H200 (issue 13, items 2-3), the
# steps in the order they matter (the archive is rewritten after each, so a run cut short by
# the device budget keeps what it finished):
#  1. ci-smoke plain (smoke-a);
#  2. the committed baseline (board unknown) against smoke-a (normalized energy; must pass);
#  3. a slowed triton-nf4 (a worse tuned table: scripts/slow_nf4_table.py), with bf16 beside it
#     so its energy is calibrated, against smoke-a and the committed baseline (must fail at
#     M = 1 and 16 on the three shapes: the table's buckets);
#  4. ci-smoke through `--gpus 0` (smoke-b), gated against smoke-a (same board: absolute
#     energy; must pass), and its records against the plain ones (same keys, statuses, board).
# Run folders go to $GATE (default /tmp/gate-boards), then one archive $OUT/gate-boards.tar.gz.
set -uo pipefail
export PYTHONUNBUFFERED=1
SUITE=bench/ci-smoke.toml
G=${GATE:-/tmp/gate-boards}
mkdir -p "$G"
nvidia-smi --query-gpu=index,uuid,name,power.draw --format=csv | tee "$G/gpus.csv"
pack() { tar -C "$G" -czf "$OUT/gate-boards.tar.gz" .; }  # after each step: a cut run keeps its steps
start=$(date +%s)
python3 -m dqprof bench --suite $SUITE -o "$G/smoke-a" 2> "$G/smoke-a.err" | tail -1
echo "ci-smoke plain: $(( $(date +%s) - start )) s wall"
pack
python3 -m dqprof regress --baseline bench/baselines/h200.jsonl --current "$G/smoke-a" \
  --summary "$G/committed-summary.md" --junit "$G/committed-junit.xml" 2>&1 | tail -6
echo "committed baseline vs this board: exit ${PIPESTATUS[0]}"
pack
# the slowed kernel: every tuned bucket at its tune's median candidate, not its best
# (correct, ~1.6-4x slower at M <= 16; scripts/slow_nf4_table.py)
cat profiles/h200/session7/nf4-tune.log.jsonl profiles/h200/session8/nf4-tune.log.jsonl \
  > "$G/tune-logs.jsonl"
python3 scripts/slow_nf4_table.py "$G/tune-logs.jsonl" "$G/slow-h200.json" > "$G/slow-h200.txt"
head -1 "$G/slow-h200.txt"
DQPROF_NF4_CONFIG="$G/slow-h200.json" python3 -m dqprof bench --suite $SUITE \
  --backends bf16,triton-nf4 -o "$G/smoke-slow" 2> "$G/smoke-slow.err" | tail -1
python3 -m dqprof regress --baseline "$G/smoke-a" --current "$G/smoke-slow" \
  --summary "$G/slow-summary.md" --junit "$G/slow-junit.xml" 2>&1 | tail -3
echo "slow gate (same board) exit ${PIPESTATUS[0]}"
python3 -m dqprof regress --baseline bench/baselines/h200.jsonl --current "$G/smoke-slow" \
  --summary "$G/slow-committed-summary.md" 2>&1 | tail -3
echo "slow gate (committed baseline) exit ${PIPESTATUS[0]}"
pack
start=$(date +%s)
python3 -m dqprof bench --suite $SUITE --gpus 0 -o "$G/smoke-b" 2> "$G/smoke-b.err" | tail -1
echo "ci-smoke --gpus 0: $(( $(date +%s) - start )) s wall (exit ${PIPESTATUS[0]})"
python3 -m dqprof regress --baseline "$G/smoke-a" --current "$G/smoke-b" \
  --summary "$G/rerun-summary.md" --junit "$G/rerun-junit.xml" 2>&1 | tail -4
echo "rerun gate exit ${PIPESTATUS[0]}"
python3 - "$G/smoke-a" "$G/smoke-b" <<'PY'
import sys
from dqprof.results import load_records
a, b = (load_records(p) for p in sys.argv[1:3])
ident = lambda rs: [(r["key"], r["status"], (r.get("board") or {}).get("uuid")) for r in rs]
print("plain vs --gpus 0: same keys, statuses and boards:", ident(a) == ident(b),
      f"({len(a)} vs {len(b)} records; board {ident(a)[0][2]})")
PY
pack

