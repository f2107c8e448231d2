#!/usr/bin/env bash
# One device call (2026-12-07, session 2): the rest of the issue21 fake-group grid (--skip-done over the
# committed runs) beside the memory histories of the recipes grid's five worst reserved-peak misses,
# then the ZeRO cases not yet measured.  carry: .whl (../shared/device/wheels.sh), .dswhl (deepspeed).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
cp benchmarks/results/h100-2026-12-07-fake-pg.jsonl "$OUT/fake-pg.jsonl"
python3 -m benchmarks.distributed.fake_pg --grid issue21 --out "$OUT/fake-pg.jsonl" --skip-done --jobs 8 \
  --gpu-budget-gib "${PG_BUDGET_GIB:-50}" --max-seconds "${PG_START_S:-430}" --hard-seconds "${PG_HARD_S:-540}" \
  2>&1 | grep -v "_token_id must be" > "$OUT/fake-pg.log" &
pg=$!
VRAMFIT_MEMORY_HISTORY=/tmp/hist timeout 400 python3 -m benchmarks.accuracy.harness \
  --cases benchmarks/accuracy/memory_history_cases_5.json --out "$OUT/memory_history.jsonl" > "$OUT/history.log" 2>&1
tail -3 "$OUT/history.log"
tar czf "$OUT/memory_history.tgz" -C /tmp hist
# the ZeRO cases not yet measured (deepspeed from .dswhl, carried), one at a time beside the grid
cp benchmarks/results/h100-2026-12-07-fake-pg-zero.jsonl "$OUT/fake-pg-zero.jsonl"
if [ -d .dswhl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .dswhl/*.whl; then
  PYTHONPATH=$PYTHONPATH:/tmp/ds timeout 200 python3 -m benchmarks.distributed.fake_pg --grid zero --skip-done \
    --out "$OUT/fake-pg-zero.jsonl" --jobs 1 --max-seconds 120 --hard-seconds 190 2>&1 | grep -v "_token_id must be" | tail -4
fi
wait $pg
tail -25 "$OUT/fake-pg.log"
