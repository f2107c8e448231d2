#!/usr/bin/env bash
# One device call (2026-12-07, session 3): the whole run's phases (eval, save after the steps:
# benchmarks/accuracy/phases_cases.json, 9 cases, issue 19 item 5) beside the ZeRO fake-group cases
# (issue 21, DeepSpeed 0.19.8 from the carried .dswhl; the earlier zero file's 4 runs were DDP).
# carry: .whl (../shared/device/wheels.sh), .dswhl.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
if [ -d .dswhl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .dswhl/*.whl; then
  PYTHONPATH=$PYTHONPATH:/tmp/ds timeout "${ZERO_S:-450}" python3 -m benchmarks.distributed.fake_pg --grid zero \
    --out "$OUT/fake-pg-zero.jsonl" --jobs 1 --max-seconds 380 --hard-seconds 440 2>&1 | grep -v "_token_id must be" \
    > "$OUT/zero.log" &
  zero=$!
fi
timeout "${PHASES_S:-480}" python3 -m benchmarks.accuracy.harness --cases benchmarks/accuracy/phases_cases.json \
  --out "$OUT/phases.jsonl" > "$OUT/phases.log" 2>&1
tail -4 "$OUT/phases.log"
[ -n "${zero:-}" ] && wait "$zero"
tail -8 "$OUT/zero.log" 2>/dev/null
